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


def resolve_dtype(dtype: torch.dtype | str, quant: str | None = None) -> tuple[torch.dtype, str | None]:
    """(torch dtype, quant) for a torch dtype or a weight-format name ("auto", "float32", "int4": model/quant.py), so
    the service can pass its `--dtype` through as it is."""
    from ..model.quant import weight_format

    if isinstance(dtype, str):
        dtype, named = weight_format(dtype)
        quant = quant or named
    return dtype, quant


def profile_dtype(dtype: torch.dtype | str, quant: str | None = None) -> str:
    """The weight-format name (model/formats.py WEIGHT_FORMATS) of what the shards will hold, for the scheduler's
    profile: a format name as it is, or (torch dtype, loader quant mode) mapped back to one."""
    from ..model import formats

    if isinstance(dtype, str):
        return formats.weight_format_info(dtype).name
    return formats.weight_format_name(str(dtype), quant)


def model_profile(model_path: str | Path, dtype: torch.dtype | str = "auto", kv_cache_type: str | None = None,
                  name: str | None = None, quant: str | None = None) -> Any:
    """The scheduler's ModelProfile of a model file in weight format `dtype` (a format name, or a torch dtype with
    the loader's `quant`), its KV cache in `kv_cache_type` (None: the format's default, formats.kv_cache_type).
    For "auto" the weights count at their real bytes, read from the GGUF header (an HF directory: every tensor in
    its config.json `torch_dtype`). Every planning path (plan_for_cluster, recovery, the learning loop) builds its
    profile here, so they agree."""
    from ..model import formats
    from ..model.weights import read_config
    from ..scheduler.profile import ModelProfile, TensorBytes

    path = Path(model_path)
    cfg = read_config(path)
    fmt = profile_dtype(dtype, quant)
    table = None
    if fmt == "auto":
        if path.is_dir():
            table = TensorBytes.uniform(cfg, formats.bytes_per_element(formats.hf_tensor_type(path)))
        else:
            table = TensorBytes.from_tensors(cfg, formats.read_gguf_tensors(path))
    return ModelProfile.from_config(cfg, dtype=fmt, name=name or path.stem, kv_cache_type=kv_cache_type,
                                    tensor_bytes=table)


def default_workload(context_length: int, max_seq_len: int | None = None) -> Any:
    """The workload a model is planned for when the caller names none: a context of min(trained context,
    max_seq_len or 2048) tokens, prompt and output within it."""
    from ..scheduler.workload import Workload

    ctx = min(context_length, max_seq_len or 2048)
    return Workload(prompt_tokens=min(512, ctx // 2), output_tokens=min(256, ctx // 2), context_tokens=ctx)


def plan_for_cluster(
    model_path: str | Path,
    cluster: ClusterHandle,
    strategy: str = "auto",
    dtype: torch.dtype | str = "auto",
    workload: Any = None,
    max_seq_len: int | None = None,
    quant: str | None = None,
    kv_cache_type: str | None = None,
) -> Any:
    """The scheduler's plan (PartitionPlan) for this model on this cluster's measured nodes and links, sized for
    the weight format (`dtype`, or a torch dtype + `quant`; "auto": the file's own bytes) and its KV cache type,
    with each node's bytes to fetch where it lacks the file (scheduler/load_cost.py)."""
    from ..scheduler.config import PlanConfig
    from ..scheduler.planner import plan
    from .measure import to_cluster_spec
    from .recovery import weight_sources_for

    profile = model_profile(model_path, dtype, kv_cache_type, quant=quant)
    measurement = cluster.measure()
    spec = to_cluster_spec(measurement)
    if workload is None:
        workload = default_workload(profile.context_length, max_seq_len)
    # which nodes hold the file (or cached slices of it): the plan says what each node fetches, and prefers them
    chosen = plan(profile, spec, workload, PlanConfig(strategy=strategy),
                  weight_sources_for(model_path, cluster, measurement))
    log.info("plan: %s — %s", chosen.strategy, chosen.reason)
    return chosen


def build_executor(
    model_path: str | Path,
    cluster: ClusterHandle,
    strategy: str = "auto",
    plan: Any = None,
    dtype: torch.dtype | str = "auto",
    max_seq_len: int | None = None,
    quant: str | None = None,
    kv_cache_type: str | None = None,
    **executor_options: Any,
) -> RayExecutor:
    """A RayExecutor for `model_path` on `cluster`, on `plan` or on the scheduler's plan for `strategy`. `dtype`
    may name a weight format ("auto", "int4"), as `serve --dtype` does; kv_cache_type (f32|f16|q8_0, None: the
    format's default) sizes the plan and goes to the shards."""
    dtype, quant = resolve_dtype(dtype, quant)
    if plan is None:
        plan = plan_for_cluster(model_path, cluster, strategy, dtype, max_seq_len=max_seq_len, quant=quant,
                                kv_cache_type=kv_cache_type)
    return RayExecutor(plan, model_path, cluster, dtype=dtype, max_seq_len=max_seq_len, quant=quant,
                       kv_cache_type=kv_cache_type, **executor_options)
