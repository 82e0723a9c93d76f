"""scheduler layer: pure planning of how one model is spread over a cluster (no torch, Ray, sockets or clocks).

`plan(profile, cluster, workload, config) -> PartitionPlan` is the entry point; `PartitionManager` chooses
among strategies adaptively and learns from measured outcomes.
"""

from .cluster import ClusterSpec, LinkSpec, NodeSpec
from .config import PlanConfig
from .cost import CostModel
from .errors import ClusterSpecError, InfeasiblePlanError, PlanFormatError, SchedulerError
from .manager import ManagerConfig, PartitionManager, Selection, StrategyStats
from .plan import PartitionPlan, Prediction, ShardAssignment, StageSpec
from .planner import plan, plan_candidates, plan_replicas
from .profile import PRESETS, ModelProfile, preset_profile
from .strategies.adaptive import AdaptiveConfig, AdaptiveStrategy
from .workload import Workload

__all__ = ["ClusterSpec", "LinkSpec", "NodeSpec", "PlanConfig", "CostModel", "ClusterSpecError",
           "InfeasiblePlanError", "PlanFormatError", "SchedulerError", "ManagerConfig", "PartitionManager",
           "Selection", "StrategyStats", "PartitionPlan", "Prediction", "ShardAssignment", "StageSpec", "plan",
           "plan_candidates", "plan_replicas", "PRESETS", "ModelProfile", "preset_profile", "AdaptiveConfig",
           "AdaptiveStrategy", "Workload"]
