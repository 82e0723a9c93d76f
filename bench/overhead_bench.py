"""The runtime's fixed per-step overhead (issue 7): measured decode time vs the cost model's compute prediction.

A local Ray cluster (`--nodes` raylets on 127.0.0.1, 1 CPU each) runs the tests' tiny 4-layer model (default; its
compute is microseconds, so what is measured is almost all overhead) or `--model PATH` through the real engine
(InferenceEngine over a RayExecutor), on pipeline plans of 1..nodes stages, with 1 and `--batch` concurrent greedy
requests. Each request's decode time per token is what the server's learning loop reports (eval_duration over
eval_count − 1). For each run the cost model predicts compute + network on the measured cluster without overhead
(C); scheduler/overhead.py then fits measured = a·C + o_step + k·o_stage + b·o_seq.

Printed: every (stages, batch) point, the fitted StepOverhead (the defaults in runtime/measure.py come from
this), and a leave-one-plan-out check: calibrate on the other plans' reports, predict the held-out plan, with the
overhead term (the runtime's default as prior, refitted) and without it (as before).

    python bench/overhead_bench.py [--nodes 3] [--tokens 48] [--batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ollama_distributed.model.options import GenerationOptions  # noqa: E402
from ollama_distributed.model.tokenizer import Tokenizer  # noqa: E402
from ollama_distributed.model.weights import read_config  # noqa: E402
from ollama_distributed.runtime.cluster import ClusterHandle  # noqa: E402
from ollama_distributed.runtime.distributed_run import model_profile  # noqa: E402
from ollama_distributed.runtime.engine import InferenceEngine  # noqa: E402
from ollama_distributed.runtime.measure import RAY_STEP_OVERHEAD, to_cluster_spec  # noqa: E402
from ollama_distributed.runtime.placement import uniform_plan  # noqa: E402
from ollama_distributed.runtime.ray_executor import RayExecutor  # noqa: E402
from ollama_distributed.runtime.requests import GenerationRequest  # noqa: E402
from ollama_distributed.scheduler.calibration import CalibrationConfig, Calibrator, StepTimings  # noqa: E402
from ollama_distributed.scheduler.cluster import ClusterSpec, StepOverhead  # noqa: E402
from ollama_distributed.scheduler.cost import CostModel  # noqa: E402
from ollama_distributed.scheduler.overhead import OverheadPoint, fit_overhead  # noqa: E402
from ollama_distributed.scheduler.plan import PartitionPlan  # noqa: E402

import torch  # noqa: E402

PROMPTS = ["The quick brown fox", "Once upon a time", "In a distant galaxy", "Paris is the capital of",
           "def fibonacci(n):", "1, 2, 3, 4,", "Hello! How are", "The weather today"]


def tiny_model(tmp: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = tmp / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return path


def run(engine: InferenceEngine, tok: Tokenizer, batch: int, tokens: int) -> tuple[float, int]:
    """Mean decode ms/token over `batch` concurrent greedy requests (as the learning loop measures it)."""
    opts = GenerationOptions(temperature=0, num_predict=tokens)
    handles = [engine.submit(GenerationRequest(prompt_ids=tok.encode(PROMPTS[i % len(PROMPTS)]), options=opts))
               for i in range(batch)]
    res = [h.result() for h in handles]
    per = [r.eval_duration_ns / max(1, r.eval_count - 1) / 1e6 for r in res if r.eval_count > 1]
    ctx = int(statistics.fmean(r.prompt_eval_count + r.eval_count // 2 for r in res))
    return statistics.fmean(per), ctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    path = args.model or tiny_model(Path(tempfile.mkdtemp(prefix="ohbench-")))
    cfg = read_config(path)
    tok = Tokenizer.from_gguf(path)
    profile = model_profile(path, torch.float32)  # what RayExecutor's default shards hold
    cluster = ClusterHandle.start_local(args.nodes, "4GiB")
    rows = []
    try:
        measured = to_cluster_spec(cluster.measure())
        spec = ClusterSpec(measured.nodes, measured.default_link, measured.link_overrides)  # no overhead: compute only
        names = [n.name for n in cluster.nodes()]
        for k in range(1, args.nodes + 1):
            plan_json = uniform_plan(cfg, [[n] for n in names[:k]], path.stem)
            p = PartitionPlan.from_dict(plan_json)
            ex = RayExecutor(plan_json, path, cluster, max_seq_len=512)
            with InferenceEngine(ex, tok, max_batch=args.batch) as engine:
                run(engine, tok, 1, 8)  # warm-up
                for batch in (1, args.batch):
                    for _ in range(args.repeats):
                        ms, ctx = run(engine, tok, batch, args.tokens)
                        t = StepTimings(ms, batch=batch, context_tokens=ctx)
                        c = CostModel(profile, spec, t.workload(profile), "latency").evaluate(p.stages)[0]
                        rows.append({"stages": k, "batch": batch, "measured_ms": ms, "context": ctx, "plan": p,
                                     "compute_ms": c.decode_ms_per_token})
                        print(f"stages {k} batch {batch}: measured {ms:7.3f} ms/token, predicted compute+network "
                              f"{c.decode_ms_per_token:8.4f} ms")
    finally:
        cluster.shutdown()
    points = [OverheadPoint(r["compute_ms"] / 1e3, r["stages"], r["measured_ms"] / 1e3, r["batch"]) for r in rows]
    fit = fit_overhead(points, StepOverhead())
    print(f"fit: o_step {fit.overhead.step_s * 1e3:.3f} ms, o_stage {fit.overhead.stage_s * 1e3:.3f} ms, "
          f"o_seq {fit.overhead.seq_s * 1e3:.3f} ms, scale {fit.scale:.2f}, rms {fit.rms_s * 1e3:.3f} ms "
          f"({fit.fitted})")
    # leave one plan out: calibrate on the others, predict it. "with": the runtime's default overhead as the prior,
    # refitted from the reports (what the server does); "without": no overhead term at all (before).
    with_prior = ClusterSpec(spec.nodes, spec.default_link, spec.link_overrides, RAY_STEP_OVERHEAD)
    errors = {"with_overhead": [], "without_overhead": []}
    for k in range(1, args.nodes + 1):
        train = [r for r in rows if r["stages"] != k]
        test = [r for r in rows if r["stages"] == k]
        for base, flag, key in ((with_prior, True, "with_overhead"), (spec, False, "without_overhead")):
            cal = Calibrator(base, CalibrationConfig(fit_overhead=flag))
            for r in train:
                timings = StepTimings(r["measured_ms"], batch=r["batch"], context_tokens=r["context"])
                cal.report(r["plan"], profile, timings)
            for r in test:
                pred = cal.predicted_decode_ms(r["plan"], profile, StepTimings(1.0, batch=r["batch"],
                                                                                 context_tokens=r["context"]))
                errors[key].append(abs(pred - r["measured_ms"]) / r["measured_ms"])
    for key, errs in errors.items():
        print(f"leave-one-plan-out calibration error {key.replace('_', ' ')}: mean {statistics.fmean(errs):.1%}, "
              f"max {max(errs):.1%}")
    if args.json:
        args.json.write_text(json.dumps({
            "points": [{k: v for k, v in r.items() if k != "plan"} for r in rows],
            "fit": {"step_ms": fit.overhead.step_s * 1e3, "stage_ms": fit.overhead.stage_s * 1e3,
                    "seq_ms": fit.overhead.seq_s * 1e3, "scale": fit.scale, "rms_ms": fit.rms_s * 1e3},
            "leave_one_plan_out_error": {k: {"mean": statistics.fmean(v), "max": max(v)} for k, v in errors.items()},
        }, indent=2))


if __name__ == "__main__":
    main()
