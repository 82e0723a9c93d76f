"""Planner settings (what to search, what to optimise)."""

from __future__ import annotations

from dataclasses import dataclass

from .workload import Workload

STRATEGIES = ("single", "pipeline", "tensor", "hybrid")


@dataclass(frozen=True)
class PlanConfig:
    """strategy: "auto" (compare every enabled strategy by predicted cost) or one strategy name.
    objective: "latency" minimises the time between two tokens of one sequence (sum of stage times + hops);
      "throughput" minimises the bottleneck stage (pipeline kept full, GPipe/PipeDream steady state);
      "auto" = latency when the workload's concurrency is 1, else throughput.
    enabled: strategies "auto" may choose. max_tp: largest tensor-parallel group.
    exact_node_limit: searches that are exponential in the node count (pipeline with non-uniform links,
      tensor groups) are exact up to this many candidate nodes and heuristic above (the plan says so).
    memory_headroom: fraction of each node's memory kept free (activations, fragmentation).
    hybrid_node_limit: hybrid groups are formed from at most this many of the fastest nodes.
    load_tolerance: when the planner knows which nodes hold the model's weights (scheduler/load_cost.py), a
      layout up to this fraction slower by prediction is taken if its nodes fetch less: measured nodes of one
      kind differ by a few percent of noise, and a fetch of a slice costs seconds to minutes once."""

    strategy: str = "auto"
    objective: str = "auto"
    enabled: tuple[str, ...] = STRATEGIES
    max_tp: int = 8
    exact_node_limit: int = 8
    memory_headroom: float = 0.0
    hybrid_node_limit: int = 64
    load_tolerance: float = 0.1

    def __post_init__(self) -> None:
        if self.strategy not in ("auto",) + STRATEGIES:
            raise ValueError(f"strategy must be auto or one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.objective not in ("auto", "latency", "throughput"):
            raise ValueError(f"objective must be auto, latency or throughput, got {self.objective!r}")
        bad = [s for s in self.enabled if s not in STRATEGIES]
        if bad or not self.enabled:
            raise ValueError(f"enabled strategies must be a non-empty subset of {STRATEGIES}, got {self.enabled}")
        if self.max_tp < 1 or self.exact_node_limit < 1 or self.hybrid_node_limit < 2:
            raise ValueError(f"max_tp and exact_node_limit must be >= 1, got {self.max_tp}, {self.exact_node_limit}")
        if not 0.0 <= self.load_tolerance:
            raise ValueError(f"load_tolerance must be >= 0, got {self.load_tolerance}")
        if not 0.0 <= self.memory_headroom < 1.0:
            raise ValueError(f"memory_headroom must be in [0, 1), got {self.memory_headroom}")

    def resolved_objective(self, workload: Workload) -> str:
        if self.objective != "auto":
            return self.objective
        return "latency" if workload.concurrency == 1 else "throughput"
