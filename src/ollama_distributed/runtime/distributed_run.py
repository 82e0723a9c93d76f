"""One call from "a model file and a cluster" to a running distributed executor, for `run` and `serve`.

`build_executor(model_path, cluster, strategy="auto")`: measure the cluster (runtime/measure.py), turn it into the
scheduler's ClusterSpec, ask `scheduler.plan()` for the best plan of the requested strategy, and start a
RayExecutor on it. Pass `plan=` (a PartitionPlan or its JSON dict) to skip planning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .cluster import ClusterHandle
from .ray_executor import RayExecutor

log = logging.getLogger(__name__)

_PROFILE_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def resolve_dtype(dtype: torch.dtype | str, quant: str | None = None) -> tuple[torch.dtype, str | None]:
    """(torch dtype, quant) for a torch dtype or a weight-format name ("float32", "int4": model/quant.py), so the
    service can pass its `--dtype` through as it is."""
    from ..model.quant import weight_format

    if isinstance(dtype, str):
        dtype, named = weight_format(dtype)
        quant = quant or named
    return dtype, quant


def profile_dtype(dtype: torch.dtype | str, quant: str | None = None) -> str:
    """The scheduler profile's dtype key (scheduler/profile.py DTYPE_BYTES) for what the shards will hold."""
    dtype, quant = resolve_dtype(dtype, quant)
    return quant or _PROFILE_DTYPE[dtype]


def plan_for_cluster(
    model_path: str | Path,
    cluster: ClusterHandle,
    strategy: str = "auto",
    dtype: torch.dtype | str = torch.float32,
    workload: Any = None,
    max_seq_len: int | None = None,
    quant: str | None = None,
) -> Any:
    """The scheduler's plan (PartitionPlan) for this model on this cluster's measured nodes and links (sized for
    int4 weights when quant="int4")."""
    from ..model.weights import read_config
    from ..scheduler.config import PlanConfig
    from ..scheduler.planner import plan
    from ..scheduler.profile import ModelProfile
    from ..scheduler.workload import Workload
    from .measure import to_cluster_spec

    cfg = read_config(model_path)
    profile = ModelProfile.from_config(cfg, dtype=profile_dtype(dtype, quant), name=Path(model_path).stem)
    spec = to_cluster_spec(cluster.measure())
    if workload is None:
        ctx = min(cfg.context_length, max_seq_len or 2048)
        workload = Workload(prompt_tokens=min(512, ctx // 2), output_tokens=min(256, ctx // 2), context_tokens=ctx)
    chosen = plan(profile, spec, workload, PlanConfig(strategy=strategy))
    log.info("plan: %s — %s", chosen.strategy, chosen.reason)
    return chosen


def build_executor(
    model_path: str | Path,
    cluster: ClusterHandle,
    strategy: str = "auto",
    plan: Any = None,
    dtype: torch.dtype | str = torch.float32,
    max_seq_len: int | None = None,
    quant: str | None = None,
    **executor_options: Any,
) -> RayExecutor:
    """A RayExecutor for `model_path` on `cluster`, on `plan` or on the scheduler's plan for `strategy`. `dtype`
    may name a weight format ("int4"), as `serve --dtype` does."""
    dtype, quant = resolve_dtype(dtype, quant)
    if plan is None:
        plan = plan_for_cluster(model_path, cluster, strategy, dtype, max_seq_len=max_seq_len, quant=quant)
    return RayExecutor(plan, model_path, cluster, dtype=dtype, max_seq_len=max_seq_len, quant=quant, **executor_options)
