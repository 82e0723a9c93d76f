"""Pipeline parallelism: contiguous layer ranges on a chosen, ordered subset of nodes.

The search is exact under the cost model (see search.py): it picks which nodes take part, their order and
their layer counts; a node that would slow the plan down is simply not chosen. Exactness holds for uniform
links at any size, and for per-pair links up to PlanConfig.exact_node_limit usable nodes; above that the
plan says it was found with averaged hop costs.
"""

from __future__ import annotations

from ..config import PlanConfig
from ..cost import CostModel
from ..plan import PartitionPlan
from . import search
from .base import Worker, build_stages, finish, infeasible, node_worker


def solve(cm: CostModel, workers: list[Worker], config: PlanConfig) -> tuple[float, search.Assignment, str] | None:
    """Best ordered (worker, layers) list under cm's objective, and how it was found."""
    L = cm.profile.n_layers
    reps = [w.nodes[0] for w in workers]
    uniform = cm.cluster.links_uniform([n for w in workers for n in w.nodes])
    if len(reps) < 2:
        h = r = 0.0
    elif uniform or len(reps) > 200:
        # every pair costs the same (or too many pairs to average: use the default link)
        link = cm.cluster.default_link
        h, r = link.transfer_time(cm.hidden_bytes), link.transfer_time(cm.return_bytes)
    else:
        pair_hops = [cm.hop(a, b) for a in reps for b in reps if a != b]
        pair_rets = [cm.return_hop(a, b) for a in reps for b in reps if a != b]
        h, r = sum(pair_hops) / len(pair_hops), sum(pair_rets) / len(pair_rets)
    # Latency: every stage after the first costs the runtime's fixed per-stage overhead (cost.py), charged on
    # the hop into it; the first stage's and the per-step share are the same for every layout. Throughput: every
    # stage's time grows by the same constant, which moves the bottleneck but not where it is least.
    o_stage = cm.overhead.stage_s
    if cm.objective == "latency":
        h += o_stage
        if uniform:
            res = search.latency_uniform(workers, L, h, r)
            how = "exact DP over node classes and layer cut points"
        elif len(workers) <= config.exact_node_limit:
            res = search.latency_exact(workers, L, lambda a, b: cm.hop(a.nodes[0], b.nodes[0]) + o_stage,
                                       lambda a, b: cm.return_hop(a.nodes[0], b.nodes[0]))
            how = "exact Held-Karp search over node subsets and orders"
        else:
            res = search.latency_uniform(workers, L, h, r)
            how = (f"DP with averaged hop cost: {len(workers)} nodes with per-pair links exceed the exact limit "
                   f"{config.exact_node_limit}")
    else:
        if uniform:
            hop_out, ret_out = [h] * len(workers), [r] * len(workers)
            how = "exact bisection on the bottleneck stage time"
        else:
            hop_out = [max(cm.hop(w.nodes[0], o.nodes[0]) for o in workers if o is not w) if len(workers) > 1 else 0.0
                       for w in workers]
            ret_out = [max(cm.return_hop(w.nodes[0], o.nodes[0]) for o in workers if o is not w)
                       if len(workers) > 1 else 0.0 for w in workers]
            how = "bisection on the bottleneck with each node's slowest link (per-pair links)"
        res = search.bottleneck(workers, L, hop_out, ret_out)
    if res is None:
        return None
    return res[0], res[1], how


class PipelineStrategy:
    """Layers split into stages across nodes, minimising latency or the bottleneck stage."""

    name = "pipeline"

    def plan(self, cm: CostModel, config: PlanConfig) -> PartitionPlan:
        workers = [node_worker(cm, n) for n in cm.cluster.names]
        usable = [w for w in workers if max(w.caps) >= 1]
        if not usable:
            small = max(cm.cluster.names, key=lambda n: cm.capacity[n])
            raise infeasible(cm, self.name, f"no node holds even one layer ({cm.layer_mem / 1e9:.2f} GB with its KV "
                                            f"cache); the largest, {small}, has {cm.capacity[small] / 1e9:.2f} GB")
        res = solve(cm, usable, config)
        if res is None:
            raise infeasible(cm, self.name, "no ordering of the nodes fits every layer plus the embedding and head")
        _, assignment, how = res
        stages = build_stages(cm, assignment)
        used = {a.key for a, _ in assignment}
        left_out = [w.key for w in workers if w.key not in used]
        reason = (f"{len(stages)} stage(s) on {', '.join(a.key for a, _ in assignment)} with layers "
                  f"{[n for _, n in assignment]}; {how}; objective {cm.objective}")
        if left_out:
            reason += f"; left out {len(left_out)} node(s) that would not help: {', '.join(left_out[:8])}" + \
                      (" ..." if len(left_out) > 8 else "")
        return finish(cm, stages, reason)
