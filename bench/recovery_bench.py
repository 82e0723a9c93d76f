"""Recovery cost (issue 6): time from a SIGKILL to the next token reaching the client, and replay cost.

1. Kill → next token. A local Ray cluster (`--nodes` raylets on 127.0.0.1, `--node-memory` each so the model is
   split), a RayExecutor on the scheduler's plan for `--strategy`, an InferenceEngine with the runtime's
   `Recovery` callback; a greedy stream of `--tokens` tokens is started, and after `--kill-at` tokens a shard's
   worker process is SIGKILLed (`--kill worker`), SIGSTOPped (`--kill hang`: a silent hang, found by the
   adaptive step time-out's liveness probe) or a whole non-head node removed (`--kill node`). Reported: the
   kill → next-token time, split into detection (kill → the step fails) and re-placement (new plan, new shards
   loaded; how many shards were taken over from the failed executor), the mean token interval without failure
   for comparison, and whether the text equals a run without the failure. `--no-reuse` restarts every shard
   (the behaviour before surviving shards were kept).
2. Replay cost. Replaying a sequence re-feeds its whole history (prompt + generated) as chunked prefill onto the
   new executor; its extra cost is the prefill time of that history. Measured on the executor the engine would
   replay onto (a fresh RayExecutor of the same plan, and an in-process LocalExecutor), for several history
   lengths; the slope is reported in ms per 100 tokens of history (least squares).

Model: `--model PATH` (GGUF), or by default the tests' tiny random llama (tests/helpers/tiny_gguf.py).

    python bench/recovery_bench.py [--strategy pipeline] [--kill worker|node] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ollama_distributed.model.options import GenerationOptions  # noqa: E402
from ollama_distributed.model.tokenizer import Tokenizer  # noqa: E402
from ollama_distributed.runtime.cluster import ClusterHandle  # noqa: E402
from ollama_distributed.runtime.distributed_run import build_executor  # noqa: E402
from ollama_distributed.runtime.engine import InferenceEngine  # noqa: E402
from ollama_distributed.runtime.local_executor import LocalExecutor  # noqa: E402
from ollama_distributed.runtime.recovery import Recovery  # noqa: E402
from ollama_distributed.runtime.requests import GenerationRequest  # noqa: E402


def tiny_model(tmp: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = tmp / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return path


def reference_text(path: Path, tok: Tokenizer, prompt: str, n: int) -> str:
    with InferenceEngine(LocalExecutor(path), tok) as eng:
        return eng.generate(GenerationRequest(prompt_ids=tok.encode(prompt),
                                              options=GenerationOptions(temperature=0, num_predict=n))).text


def kill_to_next_token(path: Path, cluster: ClusterHandle, strategy: str, kill: str, tokens: int, kill_at: int,
                       prompt: str, reuse: bool = True) -> dict:
    tok = Tokenizer.from_gguf(path)
    want = reference_text(path, tok, prompt, tokens)
    recovery = Recovery(path, cluster, strategy, reuse_survivors=reuse)
    failed_at: list[float] = []
    inner_recover = recovery.__call__

    def recover(exc, old):
        failed_at.append(time.perf_counter())
        return inner_recover(exc, old)

    t_build = time.perf_counter()
    executor = build_executor(path, cluster, strategy)
    build_s = time.perf_counter() - t_build
    engine = InferenceEngine(executor, tok, recover=recover)
    stopped: list[int] = []
    try:
        handle = engine.submit(GenerationRequest(prompt_ids=tok.encode(prompt),
                                                 options=GenerationOptions(temperature=0, num_predict=tokens)))
        times: list[float] = []
        parts: list[str] = []
        t_kill = None
        for chunk in handle:
            now = time.perf_counter()
            if chunk.done:
                assert not chunk.error, chunk.error
                break
            parts.append(chunk.text)
            times.append(now)
            if len(times) == kill_at:
                t_kill = _kill(cluster, engine.executor.placement(), kill, stopped)
        text = "".join(parts)
        # the longest wait for a token after the kill (a node kill takes a moment to land, so tokens may still
        # arrive right after t_kill; the recovery is the stall)
        after = [t_kill] + [t for t in times if t > t_kill]
        stall = max(b - a for a, b in zip(after, after[1:]))
        normal = [b - a for a, b in zip(times[1:kill_at], times[2:kill_at])]
        if not recovery.records:  # a node kill lands asynchronously: the stream may end first
            return {"strategy": strategy, "kill": kill, "failure_observed": False, "identical_text": text == want}
        rec = recovery.records[-1]
        return {
            "failure_observed": True,
            "strategy": strategy, "kill": kill, "tokens": len(times), "killed_at_token": kill_at,
            "kill_to_next_token_s": stall,
            "detect_s": failed_at[0] - t_kill if failed_at else None,
            "replace_s": rec.seconds,
            "new_executor_start_s": rec.start_s,
            "reused_shards": rec.reused_shards,
            "reuse": reuse,
            "initial_build_s": build_s,
            "normal_token_interval_ms": 1e3 * statistics.median(normal),
            "identical_text": text == want,
            "failure_kind": rec.report.kind,
        }
    finally:
        engine.close()
        for pid in stopped:  # normally the executor killed it already; never leave a stopped process behind
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break


def _kill(cluster: ClusterHandle, placement: dict, kill: str, stopped: list[int]) -> float:
    shards = [s for st in placement["stages"] for s in st["shards"]]
    heads = {n.node_id for n in cluster.nodes() if n.is_head}
    victim = next((s for s in reversed(shards) if s["node_id"] not in heads), shards[-1])
    t = time.perf_counter()
    if kill == "worker":
        os.kill(victim["pid"], signal.SIGKILL)
    elif kill == "hang":
        stopped.append(victim["pid"])
        os.kill(victim["pid"], signal.SIGSTOP)
    else:
        threading.Thread(target=cluster.kill_node, args=(cluster.name_of(victim["node_id"]),), daemon=True).start()
    return t


def replay_cost(executor, lengths: list[int], vocab: int, repeats: int = 3, chunk: int = 512) -> dict:
    """Prefill time of a `length`-token history fed in `chunk`-token steps (how the engine replays)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    sid = 1000
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        best = float("inf")
        for _ in range(repeats):
            sid += 1
            t0 = time.perf_counter()
            for i in range(0, n, chunk):
                executor.step([sid], [ids[i:i + chunk]])
            best = min(best, time.perf_counter() - t0)
            executor.free(sid)
        rows.append((n, best * 1e3))
    xs, ys = [r[0] for r in rows], [r[1] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in rows) / sum((x - mx) ** 2 for x in xs)
    return {"ms_per_100_tokens": 100 * slope, "points_ms": dict(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--node-memory", default="34MiB")
    ap.add_argument("--strategy", default="pipeline")
    ap.add_argument("--kill", choices=["worker", "hang", "node", "both", "all"], default="all",
                    help="both: worker and node; all: worker, hang and node")
    ap.add_argument("--no-reuse", action="store_true", help="restart every shard on recovery (the old behaviour)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--kill-at", type=int, default=100)
    ap.add_argument("--lengths", default="100,200,400,800")
    ap.add_argument("--replay-smollm2", action="store_true",
                    help="also measure replay cost in-process on the real SmolLM2-135M (bundled GGUF, fp32)")
    ap.add_argument("--skip-kill", action="store_true", help="only measure replay cost")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="recbench-"))
    path = args.model or tiny_model(tmp)
    out: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}, "model": str(path)}
    cluster = ClusterHandle.start_local(args.nodes, args.node_memory)
    try:
        kills = {"both": ["worker", "node"], "all": ["worker", "hang", "node"]}.get(args.kill, [args.kill])
        out["kill"] = [] if args.skip_kill else [
            kill_to_next_token(path, cluster, args.strategy, k, args.tokens, args.kill_at, "The quick brown fox",
                               reuse=not args.no_reuse)
            for k in kills]
        lengths = [int(x) for x in args.lengths.split(",")]
        ray_ex = build_executor(path, cluster, args.strategy)
        try:
            out["replay_ray"] = replay_cost(ray_ex, lengths, ray_ex.config.vocab_size)
        finally:
            ray_ex.close()
    finally:
        cluster.shutdown()
    local = LocalExecutor(path)
    out["replay_local"] = replay_cost(local, lengths, local.config.vocab_size)
    local.close()
    if args.replay_smollm2:
        from ollama_distributed.model.bundled import bundled_model_path

        big = LocalExecutor(bundled_model_path("smollm2:135m"))
        out["replay_local_smollm2"] = replay_cost(big, lengths, big.config.vocab_size)
        big.close()
    for r in out["kill"]:
        if not r["failure_observed"]:
            print(f"{r['strategy']:>9} {r['kill']:>6}: the stream ended before the failure was noticed; rerun")
            continue
        print(f"{r['strategy']:>9} {r['kill']:>6} kill → next token {r['kill_to_next_token_s']:6.2f} s "
              f"(detect {r['detect_s']:.2f} s, re-place {r['replace_s']:.2f} s, of which new executor "
              f"{r['new_executor_start_s'] or 0:.2f} s, {r['reused_shards']} shard(s) reused; first build "
              f"{r['initial_build_s']:.2f} s; normal token "
              f"{r['normal_token_interval_ms']:.1f} ms; ratio vs 5 s target {r['kill_to_next_token_s'] / 5:.2f}×) "
              f"identical text: {r['identical_text']}")
    for k in [k for k in ("replay_ray", "replay_local", "replay_local_smollm2") if k in out]:
        print(f"{k}: {out[k]['ms_per_100_tokens']:.1f} ms per 100 tokens of history  {out[k]['points_ms']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
