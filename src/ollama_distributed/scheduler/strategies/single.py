"""The whole model on one node — the best one — and, when asked, as many replicas as fit."""

from __future__ import annotations

from ..config import PlanConfig
from ..cost import CostModel
from ..plan import PartitionPlan
from .base import build_stages, finish, infeasible, node_worker


class SingleStrategy:
    """One node holds every layer; picks the node with the lowest predicted cost."""

    name = "single"

    def plan(self, cm: CostModel, config: PlanConfig) -> PartitionPlan:
        L = cm.profile.n_layers
        best = None
        for name in cm.cluster.names:
            w = node_worker(cm, name)
            if w.caps[3] >= L:
                c = L * w.t_layer + w.t_head
                if best is None or c < best[0]:
                    best = (c, w)
        if best is None:
            big = max(cm.cluster.names, key=lambda n: cm.capacity[n])
            raise infeasible(cm, self.name, f"the largest node, {big}, holds {cm.capacity[big] / 1e9:.1f} GB",
                             nodes=[big])
        stages = build_stages(cm, [(best[1], L)])
        return finish(cm, stages, f"whole model on {best[1].key}, the fastest node that holds it")

    def replicas(self, cm: CostModel, config: PlanConfig, max_replicas: int = 0) -> list[PartitionPlan]:
        """Single-node replicas, fastest first, one per node that holds the model (0 = as many as fit)."""
        L = cm.profile.n_layers
        fits = [node_worker(cm, n) for n in cm.cluster.names]
        fits = sorted((w for w in fits if w.caps[3] >= L), key=lambda w: L * w.t_layer + w.t_head)
        if max_replicas:
            fits = fits[:max_replicas]
        if not fits:
            self.plan(cm, config)  # raises the explanatory error
        return [finish(cm, build_stages(cm, [(w, L)]), f"replica {i + 1} of {len(fits)} on {w.key}")
                for i, w in enumerate(fits)]
