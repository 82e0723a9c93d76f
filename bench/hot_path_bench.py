"""The distributed hot path (issue 15): what a sharded token costs over the same shards in one process.

Two parts, each side by side in one run:

  runtime  SmolLM2-135M in its file's own types (the default weight format, "auto") on a local Ray cluster of
           1-CPU nodes, decode ms/token of one greedy sequence, rounds interleaved:
             in-process LocalExecutor with 1 thread (the reference),
             single / pp2 / tp2 over three data paths: "calls" (before issue 15: one Ray call per worker per
             step, logits shipped to the driver and sampled there), "gloo" (resident step loops fed through
             shared memory, the last stage samples; activations, tensor-parallel sums and fed-back tokens still
             over gloo on loopback: OLLAMA_DISTRIBUTED_SHM_COMM=0), "relay" (shared memory, one step sent ahead
             whose tokens the driver relays to stage 0: OLLAMA_DISTRIBUTED_LOOKAHEAD=1) and "shm" (the default:
             activations, sums and the output rank's tokens fed straight to stage 0 in shared memory,
             runtime/shm_comm.py, two steps ahead; tensor parallelism alone keeps the relay, lookahead_depth);
           and the per-hop cost: slope of decode ms/token over 0..3 stage hops of a 4-layer tiny model
           (~1 ms of compute), per data path.
  api      decode tok/s through /api/generate (eval_count / eval_duration, greedy, 64 tokens) of real
           `ollama-distributed serve` processes: --local-nodes 1 --strategy single; --local-nodes 2 with
           --node-memory below the model (a forced 2-stage pipeline); --local-nodes 2 --strategy tensor (single
           also with OLLAMA_DISTRIBUTED_LOOKAHEAD=0: no decode step sent ahead, runtime/lookahead.py; the other two
           also with OLLAMA_DISTRIBUTED_LOOKAHEAD=1: the driver relays each token to stage 0); and the
           in-process server (no Ray) limited to 1 thread (OMP_NUM_THREADS=1), each as a ratio to the last (and
           to the in-process server with 2); every setup once per pass, `--passes` passes.

The machine this ran on is shared with other sessions: read ratios within one run, not absolute numbers.

    python bench/hot_path_bench.py [runtime|api|all] [--tokens 32] [--rounds 5] [--passes 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = [1, 504, 3145, 282, 1345, 314, 253, 1345, 30, 2, 504, 3145, 282, 1345, 314, 253]
SHAPES = {"single": [["node0"]], "pp2": [["node0"], ["node1"]], "tp2": [["node0", "node1"]]}


def decode_ms(ex, n: int, sampled: bool) -> float:
    """Median ms of a greedy decode step for one sequence; `sampled`: through step_sampled (token ids back)."""
    from ollama_distributed.model.options import GenerationOptions
    from ollama_distributed.model.sampling import Sampler

    sampler = Sampler(GenerationOptions.from_dict({"temperature": 0}), 512)
    hist = list(PROMPT)
    sid = 1000

    def step(feed: list[int]) -> int:
        if sampled:
            return ex.step_sampled([sid], [feed], [sampler], [hist])[0]
        return sampler.sample(ex.step([sid], [feed])[0], hist)

    tok = step(list(PROMPT))
    times = []
    for _ in range(n):
        hist.append(tok)
        t0 = time.perf_counter()
        tok = step([tok])
        times.append(time.perf_counter() - t0)
    ex.free(sid)
    return statistics.median(times[2:]) * 1e3


def runtime_part(tokens: int, rounds: int) -> dict:
    import torch

    from ollama_distributed.model.bundled import bundled_model_path
    from ollama_distributed.model.weights import read_config
    from ollama_distributed.runtime.cluster import ClusterHandle
    from ollama_distributed.runtime.distributed_run import resolve_dtype
    from ollama_distributed.runtime.local_executor import LocalExecutor
    from ollama_distributed.runtime.placement import uniform_plan

    path = bundled_model_path("smollm2:135m")
    dtype, quant = resolve_dtype("auto")
    cfg = read_config(path)
    torch.set_num_threads(1)
    local = LocalExecutor(path, dtype=dtype, quant=quant, max_seq_len=512)
    # node budgets are Ray resources, not memory use: room for three shards' reservations per node
    cluster = ClusterHandle.start_local(6, "6GiB")
    res: dict = {}
    try:
        # each data path on two nodes of its own (the fourth shares the first's): the same shapes
        exs = {}
        for i, path_name in enumerate(PATHS):
            on = {"node0": f"node{2 * (i % 3)}", "node1": f"node{2 * (i % 3) + 1}"}
            for shape in SHAPES:
                exs[(shape, path_name)] = _executor(path_name, uniform_plan(
                    cfg, [[on[n] for n in row] for row in SHAPES[shape]], "smollm2"), path, cluster, dtype=dtype,
                    quant=quant, max_seq_len=512)
        samples: dict[str, list[float]] = {}
        for r in range(rounds):
            row = {"local_1_thread": decode_ms(local, tokens, False)}
            for (shape, tr), ex in exs.items():
                row[f"{shape}_{tr}"] = decode_ms(ex, tokens, sampled=(tr != "calls"))
            for k, v in row.items():
                samples.setdefault(k, []).append(v)
            print(f"round {r}: " + " ".join(f"{k} {v:.1f}" for k, v in row.items()), file=sys.stderr, flush=True)
        transfers = {tr: transfer_ms(exs[("pp2", tr)]) for tr in PATHS if tr != "calls"}
        for ex in exs.values():
            ex.close()
        res = {k: statistics.median(v) for k, v in samples.items()}
        for tr, (hop, back) in transfers.items():
            res[f"pp2_hop_ms_{tr}"], res[f"pp2_back_ms_{tr}"] = hop, back
        res.update(hop_slope(cluster, tokens))
    finally:
        local.close()
        cluster.shutdown()
    base = res["local_1_thread"]
    print(f"\nruntime: SmolLM2 (auto format), decode ms/token, median of {rounds} rounds; "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"{'':10}" + "".join(f"{p:>22}" for p in PATHS))
    print(f"{'in-proc':10}{base:10.2f} ms  1.00x")
    for shape in SHAPES:
        print(f"{shape:10}" + "".join(f"{res[f'{shape}_{p}']:14.2f} ms {base / res[f'{shape}_{p}']:5.2f}x"
                                      for p in PATHS))
    print("per hop (tiny model, slope over 0..3 hops, up to 4 stages on this machine's cores): "
          + ", ".join(f"{p} {res[f'per_hop_ms_{p}']:.3f} ms" for p in PATHS))
    print("one hop (tiny model, 2 stages minus 1, a core per stage): "
          + ", ".join(f"{p} {res[f'one_hop_ms_{p}']:.3f} ms" for p in PATHS))
    print("pp2, from the shards' clocks (median of the last decode steps): the hop (stage 0's output computed -> "
          "stage 1's input ready) / the token back (sampled on stage 1 -> stage 0's next input ready): "
          + ", ".join(f"{p} {res[f'pp2_hop_ms_{p}']:.3f} / {res[f'pp2_back_ms_{p}']:.3f} ms"
                      for p in PATHS if p != "calls"))
    return res


def transfer_ms(ex, last: int = 40) -> tuple[float, float]:
    """A two-stage executor's last decode steps, timed on its shards' own clocks (worker.py `timeline`: one
    CLOCK_MONOTONIC for every process of this host): the median hop (stage 0's "out" to the first "in" of stage 1
    after it) and token back (stage 1's "sampled" to the first "in" of stage 0 after it). Matched by time, not by
    index: a step sent ahead may still be running on one stage when the timelines are read."""
    import bisect

    import ray

    first, second = ray.get([w.recent_steps.remote() for w in ex._workers])

    def gaps(src: list, dst: list) -> float:
        out = []
        for a in src:
            j = bisect.bisect_left(dst, a)
            if j < len(dst):
                out.append(dst[j] - a)
        return statistics.median(out[-last:]) * 1e3

    def times(tl: list, kind: str) -> list:
        return [t for k, t in tl if k == kind]

    return gaps(times(first, "out"), times(second, "in")), gaps(times(second, "sampled"), times(first, "in"))


PATHS = ("calls", "gloo", "relay", "shm")
# what each data path sets while its executor starts (the driver reads these there): "relay" is the default path
# with one step sent ahead, whose tokens the driver relays to stage 0 (the path before the output rank fed them)
PATH_ENV = {"calls": {"OLLAMA_DISTRIBUTED_SHM_COMM": "1"}, "gloo": {"OLLAMA_DISTRIBUTED_SHM_COMM": "0"},
            "relay": {"OLLAMA_DISTRIBUTED_SHM_COMM": "1", "OLLAMA_DISTRIBUTED_LOOKAHEAD": "1"},
            "shm": {"OLLAMA_DISTRIBUTED_SHM_COMM": "1"}}


def _executor(path_name: str, plan, model, cluster, **kw):
    """A RayExecutor on one of the data paths (PATHS)."""
    from ollama_distributed.runtime.ray_executor import RayExecutor

    before = {k: os.environ.get(k) for k in PATH_ENV[path_name]}
    os.environ.update(PATH_ENV[path_name])
    try:
        return RayExecutor(plan, model, cluster, transport="calls" if path_name == "calls" else "dist", **kw)
    finally:
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def hop_slope(cluster, tokens: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    from ollama_distributed.model.weights import read_config
    from ollama_distributed.runtime.placement import uniform_plan

    tiny = write_tiny_llama_gguf(Path(tempfile.mkdtemp()) / "tiny.gguf")
    cfg = read_config(tiny)
    out = {}
    for tr in PATHS:
        xs, ys = [], []
        for k in range(1, 5):
            ex = _executor(tr, uniform_plan(cfg, [[f"node{i}"] for i in range(k)], "tiny"), tiny, cluster,
                           max_seq_len=512)
            ms = min(decode_ms(ex, tokens, sampled=(tr != "calls")) for _ in range(3))
            ex.close()
            xs.append(k - 1)
            ys.append(ms)
            out[f"tiny_pp{k}_{tr}_ms"] = ms
        mx, my = statistics.mean(xs), statistics.mean(ys)
        out[f"per_hop_ms_{tr}"] = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        # one hop between two stages with a core each (this machine has 2): beyond that, stages share cores
        out[f"one_hop_ms_{tr}"] = ys[1] - ys[0]
    return out


# ---- through the API ------------------------------------------------------------------------------------------

def _post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def api_tok_s(args: list[str], env: dict, tokens: int, rounds: int) -> list[float]:
    from serve_proc import serving

    with serving(args, env) as srv:
        body = {"model": "smollm2:135m", "prompt": "Once upon a time", "raw": True, "stream": False,
                "options": {"temperature": 0, "num_predict": tokens}}
        _post(srv.url + "/api/generate", body)  # load + warm up
        rates = []
        for _ in range(rounds):
            r = _post(srv.url + "/api/generate", body)
            rates.append((r["eval_count"] - 1) / (r["eval_duration"] / 1e9) if r["eval_count"] > 1 else 0.0)
        return rates


def api_part(tokens: int, rounds: int, passes: int) -> dict:
    from ollama_distributed.model.bundled import bundled_model_path

    size_mib = bundled_model_path("smollm2:135m").stat().st_size / 2**20
    # each node below the model with its KV cache (~1.5x the file), two together above it: a 2-stage pipeline
    below = f"{int(size_mib * 1.15)}MiB"
    pp2 = ["--local-nodes", "2", "--node-memory", below, "--strategy", "pipeline"]
    tp2 = ["--local-nodes", "2", "--strategy", "tensor"]
    single = ["--local-nodes", "1", "--strategy", "single"]
    off = {"OLLAMA_DISTRIBUTED_LOOKAHEAD": "0"}  # no step sent ahead (runtime/lookahead.py)
    relay = {"OLLAMA_DISTRIBUTED_LOOKAHEAD": "1"}  # one step ahead, its tokens relayed to stage 0 by the driver
    setups = {
        "in-process, 2 threads": ([], {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}),
        "ray single (1 node), no lookahead": (single, off),
        "ray single (1 node)": (single, {}),
        f"pipeline 2 stages (--node-memory {below}), relay": (pp2, relay),
        f"pipeline 2 stages (--node-memory {below})": (pp2, {}),
        "tensor 2-way, relay": (tp2, relay),
        "tensor 2-way": (tp2, {}),
        "in-process, 1 thread": ([], {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    }
    # every setup once per pass, passes in turn: a drift in the machine's load spreads over all of them
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for k in range(passes):
        for name, (args, env) in setups.items():
            samples[name] += api_tok_s(args, env, tokens, rounds)
            print(f"pass {k}: {name}: {statistics.median(samples[name]):.1f} tok/s", file=sys.stderr, flush=True)
    res = {name: statistics.median(v) for name, v in samples.items()}
    base = res["in-process, 1 thread"]
    print(f"\napi: /api/generate decode tok/s (median of {passes} passes x {rounds} requests, {tokens} tokens); "
          f"load avg {os.getloadavg()[0]:.1f}")
    for name, v in res.items():
        print(f"  {name:56}{v:8.1f} tok/s {v / base:6.2f}x")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", default="all", choices=("runtime", "api", "all"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2, help="api: times every setup is started and measured")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = {}
    if args.part in ("runtime", "all"):
        out["runtime"] = runtime_part(args.tokens, args.rounds)
    if args.part in ("api", "all"):
        out["api"] = api_part(max(args.tokens, 64), args.rounds, args.passes)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
