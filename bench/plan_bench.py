"""Planner benchmark: planning time on 1,000 simulated nodes × 128 layers, and predicted decode latency of our
plans against two peers' splitting rules on heterogeneous clusters (all numbers from our cost model).

Peers (re-implemented from their documented rules, no code copied):
  exo (memory-weighted ring partitioning): nodes sorted by memory, largest first; node i takes the layers
    between round(L · cumulative memory share) boundaries — a pipeline proportional to memory.
  distributed-llama: tensor parallelism with equal slices on 2^k nodes (its root node keeps the embedding and
    output head); we try every 2^k that divides the KV heads and keep its best.
Run: python bench/plan_bench.py
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ollama_distributed.scheduler import (ClusterSpec, InfeasiblePlanError, LinkSpec, ModelProfile,  # noqa: E402
                                          NodeSpec, PlanConfig, Workload, plan)
from ollama_distributed.scheduler.cost import CostModel  # noqa: E402
from ollama_distributed.scheduler.plan import ShardAssignment, StageSpec  # noqa: E402
from ollama_distributed.scheduler.profile import preset_profile  # noqa: E402

GB = 10**9
# (memory, bandwidth B/s, FLOP/s) of common machines (fp16 dense, vendor figures)
SKUS = {
    "a100-80": (80 * GB, 2.0e12, 312e12), "h100-80": (80 * GB, 3.35e12, 990e12), "rtx4090": (24 * GB, 1.0e12, 165e12),
    "rtx3060": (12 * GB, 360e9, 25e12), "m2-max": (32 * GB, 400e9, 27e12), "m2-air": (16 * GB, 100e9, 7e12),
    "epyc": (256 * GB, 200e9, 4e12), "pi5": (8 * GB, 17e9, 0.1e12),
}


def sku_cluster(counts: dict[str, int], link: LinkSpec = LinkSpec(2e-4, 1.25e9), jitter: float = 0.0,
                seed: int = 0) -> ClusterSpec:
    rng = random.Random(seed)
    nodes = []
    for sku, n in counts.items():
        mem, bw, fl = SKUS[sku]
        for i in range(n):
            j = (lambda: rng.uniform(1 - jitter, 1 + jitter)) if jitter else (lambda: 1.0)
            nodes.append(NodeSpec(f"{sku}-{i}", int(mem * j()), bw * j(), fl * j()))
    return ClusterSpec(tuple(nodes), link)


def timing(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_planning_time() -> None:
    prof = ModelProfile("synthetic-128-layer", 128, 8192, 64, 8, 128, 28672, 128256, context_length=8192)
    mix = {"h100-80": 60, "a100-80": 90, "rtx4090": 200, "rtx3060": 150, "m2-max": 150, "m2-air": 150, "epyc": 100,
           "pi5": 100}
    clusters = {"1000 nodes, 8 SKUs": sku_cluster(mix), "1000 distinct nodes (±10%)": sku_cluster(mix, jitter=0.1)}
    print("\nPlanning time, 1,000 nodes × 128 layers (median of 5, this machine)")
    print(f"{'cluster':28s} {'strategy':9s} {'objective':10s} {'ms':>8s}  stages  decode ms/token")
    for label, c in clusters.items():
        for strategy, objective, conc in (("pipeline", "latency", 1), ("pipeline", "throughput", 8),
                                          ("auto", "latency", 1)):
            cfg = PlanConfig(strategy=strategy, objective=objective)
            w = Workload(prompt_tokens=512, output_tokens=256, concurrency=conc)
            ms = timing(lambda: plan(prof, c, w, cfg), repeat=5 if strategy == "pipeline" else 1)
            p = plan(prof, c, w, cfg)
            print(f"{label:28s} {strategy:9s} {objective:10s} {ms:8.1f}  {len(p.stages):6d}  "
                  f"{p.predicted.decode_ms_per_token:.2f}")


def exo_stages(cm: CostModel) -> list[StageSpec] | None:
    p = cm.profile
    nodes = sorted(cm.cluster.nodes, key=lambda n: (-n.memory_bytes, n.name))
    total = sum(n.memory_bytes for n in nodes)
    stages, cum, start = [], 0, 0
    for i, n in enumerate(nodes):
        cum += n.memory_bytes
        end = p.n_layers if i == len(nodes) - 1 else round(p.n_layers * cum / total)
        if end > start:
            stages.append((n.name, start, end))
        start = max(start, end)
    out = []
    for i, (name, s, e) in enumerate(stages):
        mem = cm.shard_memory(e - s, p.n_kv_heads, p.ffn_size, i == 0, i == len(stages) - 1)
        out.append(StageSpec((s, e), (ShardAssignment(name, (0, p.n_heads), (0, p.n_kv_heads), (0, p.ffn_size),
                                                      mem),)))
    return out


def dllama_stages(cm: CostModel) -> list[StageSpec] | None:
    p = cm.profile
    best, best_cost = None, None
    k = 2
    while k <= min(len(cm.cluster.nodes), p.n_kv_heads):
        if p.n_kv_heads % k == 0 and p.ffn_size % k == 0:
            # the k fastest nodes, root first
            names = sorted(cm.cluster.names, key=cm.t_layer)[:k]
            a, f = p.n_kv_heads // k, p.ffn_size // k
            g = p.group_size
            shards = tuple(ShardAssignment(n, (j * a * g, (j + 1) * a * g), (j * a, (j + 1) * a), (j * f, (j + 1) * f),
                                           cm.shard_memory(p.n_layers, a, f, True, j == 0))
                           for j, n in enumerate(names))
            st = [StageSpec((0, p.n_layers), shards)]
            if not cm.check_memory(st):
                c = cm.evaluate(st)[1]
                if best_cost is None or c < best_cost:
                    best, best_cost = st, c
        k *= 2
    return best


def bench_vs_peers() -> None:
    scenarios = [
        ("home mix (examples/cluster.yaml)", "llama3-8b",
         ClusterSpec.from_dict(__import__("yaml").safe_load(
             (Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml").read_text()))),
        ("1 rtx4090 + 3 m2-air", "llama-13b", sku_cluster({"rtx4090": 1, "m2-air": 3})),
        ("2 a100 + 2 rtx4090 + 4 m2-max", "llama-70b", sku_cluster({"a100-80": 2, "rtx4090": 2, "m2-max": 4})),
        ("1 epyc (big, slow) + 4 rtx3060", "llama3-8b", sku_cluster({"epyc": 1, "rtx3060": 4})),
        ("8 pi5 + 1 m2-max", "llama3-8b", sku_cluster({"pi5": 8, "m2-max": 1}, LinkSpec(5e-4, 1.25e8))),
        ("8 rtx4090 (10 Gbit/s)", "llama-70b", sku_cluster({"rtx4090": 8}, LinkSpec(5e-5, 1.25e9))),
    ]
    w = Workload(prompt_tokens=512, output_tokens=256)
    print("\nPredicted decode latency (ms/token, f16, concurrency 1; lower is better; ratio = peer / ours)")
    print(f"{'cluster':34s} {'model':10s} {'ours':>9s} {'(shape)':10s} {'exo mem-prop':>13s} {'ratio':>6s} "
          f"{'dllama eq-TP':>13s} {'ratio':>6s}")
    for label, model, c in scenarios:
        prof = preset_profile(model)
        cm = CostModel(prof, c, w, "latency")
        try:
            ours = plan(prof, c, w, PlanConfig())
            o = ours.predicted.decode_ms_per_token
            shape = f"{ours.strategy[:4]} {len(ours.stages)}x{max(len(s.shards) for s in ours.stages)}"
        except InfeasiblePlanError:
            o, shape = float("nan"), "infeasible"
        cols = []
        for st in (exo_stages(cm), dllama_stages(cm)):
            if st is None:
                cols.append(("no fit", ""))
            elif cm.check_memory(st):
                cols.append(("over mem", ""))
            else:
                v = cm.evaluate(st)[0].decode_ms_per_token
                cols.append((f"{v:.2f}", f"{v / o:.2f}"))
        print(f"{label:34s} {model:10s} {o:9.2f} {shape:10s} {cols[0][0]:>13s} {cols[0][1]:>6s} "
              f"{cols[1][0]:>13s} {cols[1][1]:>6s}")


if __name__ == "__main__":
    bench_planning_time()
    bench_vs_peers()
