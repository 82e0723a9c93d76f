"""What every strategy shares: the interface, stage building, and the infeasibility message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from ..config import PlanConfig
from ..cost import CostModel
from ..errors import InfeasiblePlanError
from ..plan import PartitionPlan, ShardAssignment, StageSpec, shape_strategy
from ..units import format_bytes

Range = tuple[int, int]


class PartitionStrategy(Protocol):
    """A way of laying one model replica out on a cluster."""

    name: str

    def plan(self, cm: CostModel, config: PlanConfig) -> PartitionPlan:
        """The best plan this strategy finds under `cm`; raises InfeasiblePlanError when none fits."""
        ...


@dataclass(frozen=True)
class Worker:
    """A pipeline-stage candidate: one node, or a tensor-parallel group (hybrid).

    nodes[0] is the representative: it sends/receives stage hops and holds the output head.
    t_layer: decode seconds per layer. t_head: output head seconds on nodes[0].
    caps: layers that fit as (plain, first stage, last stage, only stage); -1 = the role does not fit.
    shares: per node, (kv_heads range, FFN-unit range) of every layer it holds (FFN units: columns, or the
      experts of an MoE model)."""

    key: str
    nodes: tuple[str, ...]
    t_layer: float
    t_head: float
    caps: tuple[int, int, int, int]
    shares: tuple[tuple[Range, Range], ...]


def node_worker(cm: CostModel, name: str) -> Worker:
    p = cm.profile
    caps = (cm.layers_fit(name, False, False), cm.layers_fit(name, True, False), cm.layers_fit(name, False, True),
            cm.layers_fit(name, True, True))
    return Worker(name, (name,), cm.t_layer(name), cm.t_head(name), caps, (((0, p.n_kv_heads), (0, p.ffn_units)),))


def build_stages(cm: CostModel, assignment: Sequence[tuple[Worker, int]]) -> tuple[StageSpec, ...]:
    """Stages from an ordered list of (worker, layer count), with each shard's memory."""
    g = cm.profile.group_size
    stages = []
    pos = 0
    k = len(assignment)
    for i, (w, n) in enumerate(assignment):
        shards = []
        for j, (node, (kv, ffn)) in enumerate(zip(w.nodes, w.shares)):
            mem = cm.shard_memory(n, kv[1] - kv[0], ffn[1] - ffn[0], has_embedding=(i == 0),
                                  has_output=(i == k - 1 and j == 0), shared_expert=cm.holds_shared_expert(ffn))
            if cm.profile.is_moe:  # the FFN units are whole experts: every column of the ones held
                columns, experts = (0, cm.profile.ffn_size), ffn
            else:
                columns, experts = ffn, None
            shards.append(ShardAssignment(node, (kv[0] * g, kv[1] * g), kv, columns, mem, experts))
        stages.append(StageSpec((pos, pos + n), tuple(shards)))
        pos += n
    assert pos == cm.profile.n_layers, (pos, cm.profile.n_layers)
    return tuple(stages)


def finish(cm: CostModel, stages: tuple[StageSpec, ...], reason: str) -> PartitionPlan:
    pred, _ = cm.evaluate(stages)
    over = cm.check_memory(stages)
    assert not over, f"internal: plan overfills {over}"
    return PartitionPlan(cm.profile.name, shape_strategy(stages), stages, pred, reason, cm.objective)


def model_need_bytes(cm: CostModel) -> int:
    """Bytes one replica needs at the least: every layer with its KV cache, embedding and output head."""
    p = cm.profile
    return int(p.n_layers * cm.layer_mem + p.embedding_bytes + p.head_extra_bytes(True))


def infeasible(cm: CostModel, strategy: str, detail: str = "",
               nodes: Sequence[str] | None = None) -> InfeasiblePlanError:
    """'needs 9.1 GB, the 3 nodes hold 7.5 GB' plus what else is known."""
    names = list(nodes) if nodes is not None else cm.cluster.names
    need = model_need_bytes(cm)
    have = sum(cm.capacity[n] for n in names)
    kv = cm.profile.n_layers * cm.profile.n_kv_heads * cm.kv_unit_mem
    msg = (f"{strategy}: model {cm.profile.name!r} needs {format_bytes(need)} (KV cache for "
           f"{cm.workload.context_tokens} tokens × {cm.workload.concurrency} sequences: {format_bytes(kv)}), "
           f"the {len(names)} node{'s' if len(names) != 1 else ''} hold {format_bytes(have)}")
    if detail:
        msg += f"; {detail}"
    return InfeasiblePlanError(msg, need, have, strategy)
