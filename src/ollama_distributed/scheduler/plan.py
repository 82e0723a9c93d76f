"""The planner's output: which node holds which layers and which slice of each layer.

JSON shape (ranges half-open [start, end)):
  {"model": str, "strategy": "single|pipeline|tensor|hybrid", "objective": "latency|throughput",
   "stages": [{"layers": [s, e], "shards": [{"node": str, "heads": [s, e], "kv_heads": [s, e], "ffn": [s, e],
                                             "memory_bytes": int, "experts": [s, e] (MoE models only)}]}],
   "predicted": {"decode_ms_per_token": float, "prefill_ms": float, "tokens_per_s": float},
   "reason": str, "plan_id": str,
   "load": [{"node": str, "holds": "file|slice|none", "fetch_bytes": int, "fetch_s": float}] (per shard, when the
            planner knew which nodes hold the model file: scheduler/load_cost.py)}
A plan describes one replica. The runtime turns shard j of stage i into a model ShardSpec with
has_embedding = (i == 0) and has_output = (i == last and j == 0); `heads` is always kv_heads × group size. `experts` (mixture-of-experts models): the experts of every MoE layer of the
stage this shard holds (expert parallelism; may be empty), each with all its FFN columns (`ffn` is then the whole
expert width).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..model.config import ModelConfig
from ..model.shard import ShardSpec
from .errors import PlanFormatError
from .profile import ModelProfile

STRATEGY_NAMES = ("single", "pipeline", "tensor", "hybrid")


def _range(v: Any, what: str) -> tuple[int, int]:
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise PlanFormatError(f"{what} must be a [start, end) pair of integers, got {v!r}")
    return (v[0], v[1])


@dataclass(frozen=True)
class ShardAssignment:
    """One node's part of a stage: KV groups [kv_heads), their query heads [heads), FFN columns [ffn), and of a
    mixture-of-experts model the experts [experts) of each layer (None: a dense model)."""

    node: str
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    memory_bytes: int
    experts: tuple[int, int] | None = None

    @property
    def ffn_units(self) -> int:
        """Units of the FFN axis held: experts of an MoE model, else FFN columns (the cost model's f_i)."""
        a, b = self.experts if self.experts is not None else self.ffn
        return b - a

    def to_dict(self) -> dict[str, Any]:
        d = {"node": self.node, "heads": list(self.heads), "kv_heads": list(self.kv_heads),
             "ffn": list(self.ffn), "memory_bytes": self.memory_bytes}
        if self.experts is not None:
            d["experts"] = list(self.experts)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ShardAssignment":
        if not isinstance(d, dict):
            raise PlanFormatError(f"a shard must be an object, got {d!r}")
        try:
            mem = d["memory_bytes"]
            if not isinstance(mem, int) or isinstance(mem, bool):
                raise PlanFormatError(f"memory_bytes must be an integer, got {mem!r}")
            experts = _range(d["experts"], "experts") if d.get("experts") is not None else None
            return cls(str(d["node"]), _range(d["heads"], "heads"), _range(d["kv_heads"], "kv_heads"),
                       _range(d["ffn"], "ffn"), mem, experts)
        except KeyError as exc:
            raise PlanFormatError(f"shard lacks field {exc.args[0]!r}") from None


@dataclass(frozen=True)
class StageSpec:
    """Layers [layers) held by a tensor-parallel group of shards (one shard = no tensor parallelism)."""

    layers: tuple[int, int]
    shards: tuple[ShardAssignment, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, d: Any) -> "StageSpec":
        if not isinstance(d, dict) or "layers" not in d or "shards" not in d:
            raise PlanFormatError(f"a stage needs 'layers' and 'shards', got {d!r}")
        if not isinstance(d["shards"], list):
            raise PlanFormatError("stage 'shards' must be a list")
        return cls(_range(d["layers"], "layers"), tuple(ShardAssignment.from_dict(s) for s in d["shards"]))


@dataclass(frozen=True)
class Prediction:
    """Cost-model prediction. decode_ms_per_token: time between two tokens of one sequence.
    prefill_ms: time to prefill one batch of prompts. tokens_per_s: generated tokens per second, all
    sequences together."""

    decode_ms_per_token: float
    prefill_ms: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, float]:
        return {"decode_ms_per_token": self.decode_ms_per_token, "prefill_ms": self.prefill_ms,
                "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class NodeLoad:
    """One node's load cost in a plan: what it holds ("file", "slice": part of what it needs is cached, "none"),
    the bytes it must fetch, and the seconds that takes over its link from the holder."""

    node: str
    holds: str
    fetch_bytes: int
    fetch_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "holds": self.holds, "fetch_bytes": self.fetch_bytes,
                "fetch_s": self.fetch_s}

    @classmethod
    def from_dict(cls, d: Any) -> "NodeLoad":
        try:
            return cls(str(d["node"]), str(d["holds"]), int(d["fetch_bytes"]), float(d["fetch_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanFormatError(f"a load entry needs node, holds, fetch_bytes and fetch_s, got {d!r}") from exc


def shape_strategy(stages: tuple[StageSpec, ...] | list[StageSpec]) -> str:
    """Name a plan by its shape: 1×1 single, k×1 pipeline, 1×p tensor, otherwise hybrid."""
    multi_stage = len(stages) > 1
    multi_shard = any(len(s.shards) > 1 for s in stages)
    if multi_stage and multi_shard:
        return "hybrid"
    if multi_shard:
        return "tensor"
    return "pipeline" if multi_stage else "single"


@dataclass(frozen=True)
class PartitionPlan:
    """One replica of a model laid out on a cluster."""

    model: str
    strategy: str
    stages: tuple[StageSpec, ...]
    predicted: Prediction
    reason: str
    objective: str = "latency"
    # what each shard's node must fetch before the plan runs (scheduler/load_cost.py); () when not known. Not part
    # of plan_id: the same layout is the same plan whether or not its nodes hold the file yet.
    load: tuple[NodeLoad, ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_NAMES:
            raise PlanFormatError(f"strategy must be one of {STRATEGY_NAMES}, got {self.strategy!r}")
        if not self.stages:
            raise PlanFormatError("a plan needs at least one stage")
        seen: set[str] = set()
        for st in self.stages:
            if not st.shards:
                raise PlanFormatError(f"stage {list(st.layers)} has no shards")
            for sh in st.shards:
                if sh.node in seen:
                    raise PlanFormatError(f"node {sh.node!r} appears in more than one shard")
                seen.add(sh.node)

    @property
    def plan_id(self) -> str:
        """Stable id of the layout (model + stages), independent of predictions and wording."""
        body = json.dumps({"model": self.model, "stages": [s.to_dict() for s in self.stages]}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    @property
    def nodes(self) -> list[str]:
        return [sh.node for st in self.stages for sh in st.shards]

    def memory_by_node(self) -> dict[str, int]:
        return {sh.node: sh.memory_bytes for st in self.stages for sh in st.shards}

    def to_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "strategy": self.strategy, "objective": self.objective,
             "stages": [s.to_dict() for s in self.stages], "predicted": self.predicted.to_dict(),
             "reason": self.reason, "plan_id": self.plan_id}
        if self.load:
            d["load"] = [l.to_dict() for l in self.load]
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> "PartitionPlan":
        if not isinstance(d, dict):
            raise PlanFormatError(f"a plan must be a JSON object, got {type(d).__name__}")
        try:
            p = d["predicted"]
            pred = Prediction(float(p["decode_ms_per_token"]), float(p["prefill_ms"]), float(p["tokens_per_s"]))
            if not isinstance(d["stages"], list):
                raise PlanFormatError("'stages' must be a list")
            load = tuple(NodeLoad.from_dict(l) for l in d.get("load") or ())
            plan = cls(str(d["model"]), str(d["strategy"]), tuple(StageSpec.from_dict(s) for s in d["stages"]),
                       pred, str(d.get("reason", "")), str(d.get("objective", "latency")), load)
        except (KeyError, TypeError) as exc:
            raise PlanFormatError(f"plan lacks or mistypes field {exc}") from None
        if "plan_id" in d and d["plan_id"] != plan.plan_id:
            raise PlanFormatError(f"plan_id {d['plan_id']!r} does not match its stages ({plan.plan_id})")
        return plan

    @classmethod
    def from_json(cls, text: str) -> "PartitionPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanFormatError(f"plan is not valid JSON: {exc}") from None

    def validate(self, profile: ModelProfile) -> None:
        """Raise PlanFormatError unless every layer is in exactly one stage and, within a stage, every KV
        head, query head and FFN column is in exactly one shard (each shard non-empty)."""
        pos = 0
        for st in self.stages:
            s, e = st.layers
            if s != pos or e <= s:
                raise PlanFormatError(f"stage layers {list(st.layers)} do not continue from layer {pos}")
            pos = e
            # an MoE stage is split by experts (a shard may hold none), each shard keeping whole experts
            by_expert = profile.n_expert > 0 and any(sh.experts is not None for sh in st.shards)
            axes = [("kv_heads", profile.n_kv_heads, False)]
            axes.append(("experts", profile.n_expert, True) if by_expert else ("ffn", profile.ffn_size, False))
            for sh in st.shards if by_expert else ():
                if sh.experts is None or sh.ffn != (0, profile.ffn_size):
                    raise PlanFormatError(f"stage {list(st.layers)}: {sh.node} must name its experts and hold whole "
                                          f"experts (ffn [0, {profile.ffn_size})), got experts {sh.experts}, ffn "
                                          f"{list(sh.ffn)}")
            for axis, total, may_be_empty in axes:
                cur = 0
                for sh in st.shards:
                    a, b = getattr(sh, axis)
                    if a != cur or b < a or (b == a and not may_be_empty):
                        raise PlanFormatError(f"stage {list(st.layers)}: {axis} of {sh.node} is [{a}, {b}), "
                                              f"expected to start at {cur} and be non-empty")
                    cur = b
                if cur != total:
                    raise PlanFormatError(f"stage {list(st.layers)}: {axis} cover [0, {cur}) of [0, {total})")
            g = profile.group_size
            for sh in st.shards:
                if sh.heads != (sh.kv_heads[0] * g, sh.kv_heads[1] * g):
                    raise PlanFormatError(f"{sh.node}: heads {list(sh.heads)} are not kv_heads "
                                          f"{list(sh.kv_heads)} × group size {g}")
        if pos != profile.n_layers:
            raise PlanFormatError(f"stages cover layers [0, {pos}) of [0, {profile.n_layers})")

    def shard_specs(self, cfg: ModelConfig) -> list[list[ShardSpec]]:
        """ShardSpecs for the runtime, stage by stage, in shard order."""
        last = len(self.stages) - 1
        return [[ShardSpec(st.layers, sh.kv_heads, sh.ffn, has_embedding=(i == 0), has_output=(i == last and j == 0),
                           experts=sh.experts)
                 for j, sh in enumerate(st.shards)] for i, st in enumerate(self.stages)]
