"""Plan JSON → the shards to start: one `ShardPlacement` per shard, with its ShardSpec, rank and Ray node.

Follows the plan format of scheduler/plan.py: shard j of stage i becomes
ShardSpec(stage.layers, shard.kv_heads, shard.ffn, has_embedding=(i == 0), has_output=(i == last and j == 0)).
The plan is checked against the model (every layer once, every KV head / FFN column of a stage once, heads =
kv_heads × group size) and against the cluster (every named node alive, no node over its memory budget) before
anything is started, so a bad plan fails fast with the numbers in the message instead of an actor that never
schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..model.config import ModelConfig
from ..model.shard import ShardSpec
from ..model.tp_local import split_evenly
from .cluster import MEMORY_RESOURCE, MIB, ClusterHandle, NodeNotFoundError
from .collectives import RankLayout, plan_layout


class PlacementError(ValueError):
    """A plan cannot be placed on this model or cluster; the message names the shard, node and numbers."""


@dataclass(frozen=True)
class ShardPlacement:
    """One shard to start: where (node name + Ray node id), what (spec) and who it talks to (layout)."""

    stage: int
    index: int  # position within the stage (tensor-parallel rank)
    node: str
    node_id: str
    spec: ShardSpec
    memory_bytes: int
    layout: RankLayout
    gpus: float = 0.0
    resources: Mapping[str, float] | None = None  # Ray custom resources the actor reserves (its memory budget)

    @property
    def rank(self) -> int:
        return self.layout.rank


def plan_dict(plan: Any) -> dict[str, Any]:
    """A PartitionPlan (scheduler/plan.py) or its JSON dict → the JSON dict."""
    if isinstance(plan, Mapping):
        return dict(plan)
    to_dict = getattr(plan, "to_dict", None)
    if to_dict is None:
        raise PlacementError(f"expected a PartitionPlan or its JSON dict, got {type(plan).__name__}")
    return to_dict()


def shard_specs(plan: Mapping[str, Any], cfg: ModelConfig) -> list[list[tuple[str, ShardSpec, int]]]:
    """(node, ShardSpec, memory_bytes) per shard, stage by stage; raises PlacementError on a malformed plan."""
    stages = plan.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PlacementError("plan has no 'stages' list")
    out: list[list[tuple[str, ShardSpec, int]]] = []
    next_layer = 0
    last = len(stages) - 1
    seen_nodes: set[str] = set()
    for i, stage in enumerate(stages):
        try:
            layers = (int(stage["layers"][0]), int(stage["layers"][1]))
            shards = stage["shards"]
        except (KeyError, TypeError, IndexError) as exc:
            raise PlacementError(f"stage {i} needs 'layers': [start, end) and 'shards': {exc}") from None
        if layers[0] != next_layer or layers[1] <= layers[0]:
            raise PlacementError(f"stage {i} covers layers {list(layers)}, expected a non-empty range starting at {next_layer}")
        next_layer = layers[1]
        if not shards:
            raise PlacementError(f"stage {i} has no shards")
        row = []
        kv_at, ffn_at = 0, 0
        for j, sh in enumerate(shards):
            try:
                node = str(sh["node"])
                kv = (int(sh["kv_heads"][0]), int(sh["kv_heads"][1]))
                ffn = (int(sh["ffn"][0]), int(sh["ffn"][1]))
                # a mixture-of-experts stage is split by experts (scheduler/plan.py): they, not ffn, must continue
                experts = (int(sh["experts"][0]), int(sh["experts"][1])) if sh.get("experts") is not None else None
                mem = int(sh.get("memory_bytes", 0))
            except (KeyError, TypeError, IndexError) as exc:
                raise PlacementError(f"stage {i} shard {j} needs node, kv_heads, ffn: {exc}") from None
            if node in seen_nodes:
                raise PlacementError(f"node {node!r} holds more than one shard of the plan")
            seen_nodes.add(node)
            units = experts if experts is not None else ffn
            by_expert = experts is not None if j == 0 else by_expert
            if kv[0] != kv_at or units[0] != ffn_at or (experts is not None) != by_expert:
                raise PlacementError(
                    f"stage {i} shard {j} ({node}): kv_heads {list(kv)} / {'experts' if by_expert else 'ffn'} "
                    f"{list(units)} do not continue at kv {kv_at} / {ffn_at}"
                )
            kv_at, ffn_at = kv[1], units[1]
            spec = ShardSpec(layers, kv, ffn, has_embedding=(i == 0), has_output=(i == last and j == 0),
                             experts=experts)
            try:
                spec.validate(cfg)
            except ValueError as exc:
                raise PlacementError(f"stage {i} shard {j} ({node}): {exc}") from None
            if "heads" in sh and tuple(sh["heads"]) != spec.heads(cfg):
                raise PlacementError(
                    f"stage {i} shard {j} ({node}): heads {list(sh['heads'])} are not kv_heads {list(kv)} × "
                    f"group size {cfg.group_size} = {list(spec.heads(cfg))}"
                )
            row.append((node, spec, mem))
        ffn_total = cfg.n_expert if by_expert else cfg.ffn_size
        if kv_at != cfg.n_kv_heads or ffn_at != ffn_total:
            raise PlacementError(
                f"stage {i} covers kv heads [0, {kv_at}) of {cfg.n_kv_heads} and {'experts' if by_expert else 'ffn'} "
                f"[0, {ffn_at}) of {ffn_total}"
            )
        out.append(row)
    if next_layer != cfg.n_layers:
        raise PlacementError(f"stages cover layers [0, {next_layer}) of the model's {cfg.n_layers}")
    return out


def place(plan: Any, cfg: ModelConfig, cluster: ClusterHandle) -> list[list[ShardPlacement]]:
    """Check `plan` against `cfg` and the cluster's alive nodes; return placements[stage][tp_rank]."""
    specs = shard_specs(plan_dict(plan), cfg)
    nodes = {n.name: n for n in cluster.nodes()}
    layouts = iter(plan_layout([len(row) for row in specs]))
    out = []
    for i, row in enumerate(specs):
        placed = []
        for j, (name, spec, mem) in enumerate(row):
            node = nodes.get(name)
            if node is None:
                raise NodeNotFoundError(
                    f"plan puts stage {i} shard {j} on node {name!r}, which is not alive; alive: {', '.join(nodes) or 'none'}"
                )
            if node.memory_budget is not None and mem > node.memory_budget:
                raise PlacementError(
                    f"stage {i} shard {j} needs {mem / MIB:.1f} MiB on {name}, whose budget is "
                    f"{node.memory_budget / MIB:.1f} MiB"
                )
            # Reserve the planned bytes from the node's budget so Ray's accounting matches the plan (nodes that
            # declare no budget — joined clusters without `od_memory_mib` — reserve nothing).
            res = {MEMORY_RESOURCE: float(math.ceil(mem / MIB))} if node.memory_budget is not None and mem > 0 else {}
            placed.append(ShardPlacement(i, j, name, node.node_id, spec, mem, next(layouts), min(1.0, node.gpus), res))
        out.append(placed)
    return out


def shard_weight_bytes(cfg: ModelConfig, spec: ShardSpec, dtype_bytes: int = 4) -> int:
    """Bytes of the weights a shard holds, from the model's shapes alone (what load_weights returns for it)."""
    hd, h = cfg.head_dim, cfg.hidden_size
    heads = spec.heads(cfg)[1] - spec.heads(cfg)[0]
    kv = spec.kv_heads[1] - spec.kv_heads[0]
    ffn = spec.ffn[1] - spec.ffn[0]
    per_layer = 2 * h + (heads + 2 * kv) * hd * h + h * heads * hd + 3 * ffn * h
    if cfg.n_expert:  # every expert held has its own FFN columns; the router is on every shard
        e0, e1 = spec.expert_range(cfg)
        per_layer += 3 * ffn * h * (e1 - e0 - 1) + cfg.n_expert * h
    if cfg.attention_bias:
        per_layer += (heads + 2 * kv) * hd
    n = spec.n_layers * per_layer
    embed = cfg.vocab_size * h
    if spec.has_embedding:
        n += embed
    if spec.has_output:
        n += h + (0 if (cfg.tie_embeddings and spec.has_embedding) else embed)
    return n * dtype_bytes


def split_on_grid(n: int, weights: list[float], step: int = 1) -> list[tuple[int, int]]:
    """split_evenly (model/tp_local.py) of [0, n) in whole units of `step` (a quantisation block's worth of FFN
    columns, or of KV groups), so every cut falls on the grid; unit by unit where the grid does not divide n or
    has fewer units than parts."""
    if step > 1 and n % step == 0 and n // step >= len(weights):
        return [(a * step, b * step) for a, b in split_evenly(n // step, weights)]
    return split_evenly(n, weights)


def uniform_plan(cfg: ModelConfig, stage_nodes: list[list[str]], model: str = "model", dtype_bytes: int = 4,
                 kv_step: int = 1, ffn_step: int = 1) -> dict[str, Any]:
    """A plan JSON with layers split evenly over the stages and, within a stage, KV groups split evenly over its
    nodes (FFN columns in the same proportion) — for tests, benchmarks and `--strategy` without a planner.
    kv_step / ffn_step: KV groups / FFN columns per unit of the quantisation-block grid (the scheduler profile's
    kv_step and ffn_step), so row-parallel slices are whole blocks."""
    if len(stage_nodes) > cfg.n_layers:
        raise PlacementError(f"{len(stage_nodes)} stages for {cfg.n_layers} layers")
    stages = []
    last = len(stage_nodes) - 1
    for i, (layers, nodes) in enumerate(zip(split_evenly(cfg.n_layers, [1.0] * len(stage_nodes)), stage_nodes)):
        if len(nodes) > cfg.n_kv_heads:
            raise PlacementError(f"stage {i}: {len(nodes)} tensor-parallel shards for {cfg.n_kv_heads} KV heads")
        kvs = split_on_grid(cfg.n_kv_heads, [1.0] * len(nodes), kv_step)
        ffns = split_on_grid(cfg.ffn_size, [float(e - s) for s, e in kvs], ffn_step)
        shards = []
        for j, (node, kv, ffn) in enumerate(zip(nodes, kvs, ffns)):
            spec = ShardSpec(layers, kv, ffn, i == 0, i == last and j == 0)
            shards.append({"node": node, "heads": list(spec.heads(cfg)), "kv_heads": list(kv), "ffn": list(ffn),
                           "memory_bytes": shard_weight_bytes(cfg, spec, dtype_bytes)})
        stages.append({"layers": list(layers), "shards": shards})
    shape = "x".join(str(len(n)) for n in stage_nodes)
    strategy = ("single" if len(stage_nodes) == 1 and len(stage_nodes[0]) == 1 else
                "pipeline" if all(len(n) == 1 for n in stage_nodes) else
                "tensor" if len(stage_nodes) == 1 else "hybrid")
    return {"model": model, "strategy": strategy, "stages": stages,
            "predicted": {"decode_ms_per_token": 0.0, "prefill_ms": 0.0, "tokens_per_s": 0.0},
            "reason": f"uniform split, stage widths {shape}"}
