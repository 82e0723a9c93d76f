"""`plan(model_profile, cluster, workload, config) -> PartitionPlan`: the pure entry point."""

from __future__ import annotations

from typing import Mapping

from .cluster import ClusterSpec
from .config import PlanConfig
from .cost import CostModel
from .errors import InfeasiblePlanError
from .load_cost import WeightSources, prefer_holders
from .plan import PartitionPlan
from .profile import ModelProfile
from .strategies import PartitionStrategy, builtin_strategies
from .workload import Workload


def cost_model(profile: ModelProfile, cluster: ClusterSpec, workload: Workload, config: PlanConfig) -> CostModel:
    return CostModel(profile, cluster, workload, config.resolved_objective(workload), config.memory_headroom)


def plan_candidates(profile: ModelProfile, cluster: ClusterSpec, workload: Workload, config: PlanConfig,
                    strategies: Mapping[str, PartitionStrategy] | None = None,
                    ) -> tuple[CostModel, dict[str, PartitionPlan | InfeasiblePlanError]]:
    """Every enabled strategy's best plan (or why it has none)."""
    cm = cost_model(profile, cluster, workload, config)
    strategies = strategies if strategies is not None else builtin_strategies()
    out: dict[str, PartitionPlan | InfeasiblePlanError] = {}
    for name in config.enabled:
        if name in strategies:
            try:
                out[name] = strategies[name].plan(cm, config)
            except InfeasiblePlanError as exc:
                out[name] = exc
    return cm, out


def _first_error(results: Mapping[str, PartitionPlan | InfeasiblePlanError]) -> InfeasiblePlanError:
    errors = [r for r in results.values() if isinstance(r, InfeasiblePlanError)]
    # the pipeline's message names the total need, the most useful one when nothing fits
    for e in errors:
        if e.strategy == "pipeline":
            return e
    return errors[0]


def plan(profile: ModelProfile, cluster: ClusterSpec, workload: Workload | None = None,
         config: PlanConfig | None = None, sources: WeightSources | None = None) -> PartitionPlan:
    """The best plan for one replica. config.strategy "auto" compares every enabled strategy by predicted
    cost under the resolved objective; a named strategy is used alone. Raises InfeasiblePlanError.
    sources: which nodes hold the model's weights; the plan then prefers them among layouts within
    config.load_tolerance of the best, and carries each node's bytes to fetch (load_cost.py)."""
    workload = workload or Workload()
    config = config or PlanConfig()
    if config.strategy != "auto":
        cm = cost_model(profile, cluster, workload, config)
        chosen = builtin_strategies()[config.strategy].plan(cm, config)
        return prefer_holders(chosen, cm, sources, config.load_tolerance) if sources is not None else chosen
    cm, results = plan_candidates(profile, cluster, workload, config)
    plans = {n: p for n, p in results.items() if isinstance(p, PartitionPlan)}
    if not plans:
        raise _first_error(results)
    costs = {n: cm.cost(p) for n, p in plans.items()}
    best = min(costs, key=lambda n: (costs[n], list(plans).index(n)))
    others = ", ".join(f"{n} {costs[n] * 1e3:.3f} ms" for n in sorted(costs, key=lambda n: costs[n]) if n != best)
    skipped = ", ".join(n for n, r in results.items() if isinstance(r, InfeasiblePlanError))
    chosen = plans[best]
    why = f"auto ({cm.objective}): {best} {costs[best] * 1e3:.3f} ms per token"
    if others:
        why += f" beats {others}"
    if skipped:
        why += f"; infeasible: {skipped}"
    chosen = PartitionPlan(chosen.model, chosen.strategy, chosen.stages, chosen.predicted,
                           f"{why}. {chosen.reason}", chosen.objective)
    return prefer_holders(chosen, cm, sources, config.load_tolerance) if sources is not None else chosen


def plan_replicas(profile: ModelProfile, cluster: ClusterSpec, workload: Workload | None = None,
                  config: PlanConfig | None = None, max_replicas: int = 0,
                  sources: WeightSources | None = None) -> list[PartitionPlan]:
    """Replicas on disjoint nodes: plan, remove the nodes used, repeat while a plan fits (0 = no limit).
    sources: as `plan` (the first copy takes the holders it prefers; the next copies plan on the rest)."""
    out: list[PartitionPlan] = []
    remaining = cluster
    while not max_replicas or len(out) < max_replicas:
        try:
            p = plan(profile, remaining, workload, config, sources)
        except InfeasiblePlanError:
            if not out:
                raise
            break
        out.append(p)
        left = [n for n in remaining.names if n not in set(p.nodes)]
        if not left:
            break
        remaining = remaining.subset(left)
    return out
