"""Two Ray nodes in two network namespaces joined by a veth pair: measured decode time vs the cost model.

Run as root through bench/netns_two_nodes.sh, which creates namespaces od-bench-a (10.77.0.1) and od-bench-b
(10.77.0.2), shapes the veth with `tc` (netem 1 ms delay + 1 Gbit/s where the kernel has sch_netem, else a tbf
1 Gbit/s limit alone), starts a Ray head in a and a worker in b with `ray start` (the real multi-machine path,
token auth on), and runs this driver inside namespace a. It:
  1. joins the cluster with ClusterHandle.connect(address) and measures nodes and the link;
  2. runs SmolLM2 as PP=2 (one stage per namespace) and single-node, decode ms/token each;
  3. prints the scheduler cost model's predicted decode ms/token for the same plans on the measured ClusterSpec;
  4. with FETCH=1, host B lacks the model file: its shard's fetch (bytes, seconds, MB/s) over the shaped link, and
     what the plan said it would fetch and how long that takes over the measured link (scheduler/load_cost.py).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from ollama_distributed.model.bundled import bundled_model_path
from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.cluster import ClusterHandle
from ollama_distributed.runtime.measure import to_cluster_spec
from ollama_distributed.runtime.placement import uniform_plan
from ollama_distributed.runtime.ray_executor import RayExecutor
from ollama_distributed.runtime.weight_fetch import weight_sources
from ollama_distributed.scheduler.cost import CostModel
from ollama_distributed.scheduler.load_cost import load_costs
from ollama_distributed.scheduler.plan import PartitionPlan
from ollama_distributed.scheduler.profile import ModelProfile
from ollama_distributed.scheduler.workload import Workload

PROMPT = [1, 504, 3145, 282, 1345, 314, 253, 1345]


def decode_ms(ex, n: int) -> float:
    logits = ex.step([0], [PROMPT])
    times = []
    for _ in range(n):
        tok = int(logits[0].argmax())
        t0 = time.perf_counter()
        logits = ex.step([0], [[tok]])
        times.append(time.perf_counter() - t0)
    ex.free(0)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    address, tokens = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 24
    path = bundled_model_path("smollm2:135m")
    cfg = read_config(path)
    cluster = ClusterHandle.connect(address)
    out: dict = {}
    try:
        nodes = cluster.nodes()
        out["nodes"] = [(n.name, n.address) for n in nodes]
        m = cluster.measure(gemv_bytes=64 * 2**20)
        out["measured"] = m.to_dict()
        spec = to_cluster_spec(m)
        profile = ModelProfile.from_config(cfg, dtype="f32", name="smollm2")
        workload = Workload(prompt_tokens=len(PROMPT), output_tokens=tokens, context_tokens=len(PROMPT) + tokens + 1)
        cm = CostModel(profile, spec, workload, "latency")
        # which node holds the file (FETCH=1: host A only), asked of the nodes, as the server plans with
        sources = weight_sources(path, cluster, spec)
        for name, shape in {"single_a": [["hostA"]], "pp2_a_b": [["hostA"], ["hostB"]]}.items():
            plan = uniform_plan(cfg, shape, "smollm2")
            stages = PartitionPlan.from_dict(plan).stages
            pred, _ = cm.evaluate(stages)
            # what the plan says each node fetches before it runs, and how long over the measured link
            planned = [l.to_dict() for l in load_costs(stages, sources, spec, profile) if l.fetch_bytes]
            t0 = time.perf_counter()
            ex = RayExecutor(plan, path, cluster, max_seq_len=256)
            load_s = time.perf_counter() - t0
            try:
                out[name] = {"measured_ms": decode_ms(ex, tokens), "predicted_ms": pred.decode_ms_per_token,
                             "load_s": round(load_s, 2)}
                # FETCH=1 (see the .sh): host B fetched its slice over the link; its rate vs the link's
                fetched = [sh["weights_fetched"] for st in ex.placement()["stages"] for sh in st["shards"]
                           if sh.get("weights_fetched")]
                if fetched:
                    f = fetched[0]
                    out[name]["fetch"] = dict(f, MBps=round(f["fetched_bytes"] / f["seconds"] / 1e6, 1))
                if planned:
                    out[name]["planned_fetch"] = planned
            finally:
                ex.close()
        print(json.dumps(out, indent=2))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
