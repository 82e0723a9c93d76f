"""Hybrid parallelism: pipeline stages that are tensor-parallel groups.

Search: for every TP degree p in 2..max_tp, nodes sorted by speed are cut into consecutive groups of p (nodes
of similar speed share a group, so no member waits long for the others); each group's split is the speed- and
memory-weighted optimum for one layer (tensor.split_group) and becomes a pipeline worker with a per-layer
time and a layer capacity. The exact pipeline search (search.py) then picks the groups, their order and
their layer ranges — with the leftover nodes as single-node stages in a second variant. Enumerating every
partition of the nodes into groups is exponential (Bell numbers), so the grouping itself is this heuristic.
"""

from __future__ import annotations

from ..config import PlanConfig
from ..cost import CostModel
from ..plan import PartitionPlan
from . import pipeline, search
from .base import Worker, build_stages, finish, infeasible, node_worker
from .tensor import Grid, GroupSplit, grid_note, grids, group_worker, split_group


class HybridStrategy:
    """Pipeline of TP groups."""

    name = "hybrid"

    def plan(self, cm: CostModel, config: PlanConfig) -> PartitionPlan:
        names = sorted(cm.cluster.names, key=cm.t_layer)
        note = ""
        if len(names) > config.hybrid_node_limit:
            note = f"; grouped the {config.hybrid_node_limit} fastest of {len(names)} nodes"
            names = names[:config.hybrid_node_limit]
        pmax = min(config.max_tp, cm.profile.n_kv_heads, len(names) // 2 if len(names) >= 4 else len(names))
        best = None
        for grid in grids(cm):  # the quantisation-block grid; single KV groups / columns only if nothing fits on it
            best = self._search(cm, config, names, pmax, grid)
            if best is not None:
                break
        if best is None:
            raise infeasible(cm, self.name, "no grouping of the nodes into tensor-parallel stages fits the model")
        cost, assignment, how, p, grid = best
        stages = build_stages(cm, assignment)
        desc = "; ".join(f"{'+'.join(w.nodes)} layers {n}" for w, n in assignment)
        return finish(cm, stages, f"{len(stages)} stage(s) of up to {p}-way TP: {desc}; stage search: {how}; "
                                  f"groups of speed-sorted nodes{note}{grid_note(grid, cm)}; objective "
                                  f"{cm.objective}")

    @staticmethod
    def _search(cm: CostModel, config: PlanConfig, names: list[str], pmax: int,
                grid: Grid) -> tuple[float, search.Assignment, str, int, Grid] | None:
        """The best (cost, assignment, how, TP degree, grid) over TP degrees 2..pmax with splits on `grid`."""
        splits: dict[tuple[object, ...], GroupSplit | None] = {}  # identical members give identical splits
        best = None
        for p in range(2, pmax + 1):
            groups: list[Worker] = []
            for gi in range(len(names) // p):
                members = names[gi * p:(gi + 1) * p]
                # shares sized for one layer; the memory bound enters through the worker's layer capacity
                sig = tuple((cm.rates[n], cm.capacity[n]) for n in members)
                if sig not in splits:
                    splits[sig] = split_group(cm, members, 1, has_embedding=False, has_output=False, grid=grid)
                split = splits[sig]
                if split is None:
                    continue
                split = GroupSplit(tuple(members), split.kv, split.ffn, split.t_attn, split.t_ffn)
                w = group_worker(cm, split, f"tp{p}:" + "+".join(members))
                if max(w.caps) >= 1:
                    groups.append(w)
            if not groups:
                continue
            used = {n for w in groups for n in w.nodes}
            singles = [w for w in (node_worker(cm, n) for n in names if n not in used) if max(w.caps) >= 1]
            for workers in ([groups, groups + singles] if singles else [groups]):
                res = pipeline.solve(cm, workers, config)
                if res is None or all(len(w.nodes) == 1 for w, _ in res[1]):
                    continue
                if best is None or res[0] < best[0]:
                    best = (res[0], res[1], res[2], p, grid)
        return best

