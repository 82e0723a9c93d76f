"""What a plan costs before it can run: the weight bytes each node must fetch, and plans that fetch less.

A node without the model file fetches its shards' tensors from the node that holds it (runtime/weight_fetch.py),
in verified chunks of the file, into a slice cache it keeps. So the same plan is free on one cluster and costs
minutes on another: it depends on which nodes hold the file (`Holding.has_file`) and which chunks of it each
node's cache already holds (`Holding.chunks`). The runtime gathers those facts at the edge (weight_fetch.py
`weight_sources`); everything here is pure.

- `shard_chunks`: the chunks (of a `FileLayout`, the GGUF's tensor byte ranges) a shard reads, by the rule the
  fetcher itself uses (weight_fetch.py calls it), so the bytes a plan announces are the bytes a node then fetches;
  without a layout (a preset model, no file) the shard's weight bytes by the profile stand in
  (`profile_shard_bytes`).
- `load_costs(plan, ...)`: per node of the plan, what it holds, the bytes it fetches and the seconds that takes
  over the measured link from the holder (alpha-beta, as the cost model's hops).
- `prefer_holders(plan, cm, sources)`: among layouts predicted equal-enough (within `tolerance` of the plan's
  cost), the one whose nodes fetch the least: shards move to interchangeable nodes that hold their bytes. Used
  at every placement and by recovery, so a re-plan after a node loss lands on the nodes that already hold the file
  or the lost shard's cached slice instead of one that would fetch it again.

Why swaps of whole nodes rather than a new search term: the strategies' searches are exact for decode cost under
memory constraints (strategies/); bytes to fetch are a one-off cost, paid once per node and then cached, and
weighing it against a per-token cost needs a horizon no one knows. Keeping the search as it is and then preferring
holders among near-ties keeps every plan within `tolerance` of the best predicted speed, and leaves a cluster where
every node holds the file (the usual local case) planned exactly as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from .cluster import ClusterSpec, LinkSpec
from .plan import NodeLoad, PartitionPlan, ShardAssignment, StageSpec
from .profile import ModelProfile
from .units import format_bytes

_LAYER = re.compile(r"blk\.(\d+)\.")
_EXPERTS = re.compile(r"\.ffn_(gate|up|down)_exps\.")


@dataclass(frozen=True)
class TensorExtent:
    """A tensor's bytes in the file: [start, start + n_bytes). n_expert > 0: a stacked expert tensor (ggml shape
    [in, out, n_expert], experts outermost, so each expert's matrix is one contiguous run of n_bytes / n_expert)."""

    name: str
    start: int
    n_bytes: int
    n_expert: int = 0


@dataclass(frozen=True)
class FileLayout:
    """Where a GGUF's tensors lie (read from its header at the edge) and the chunk size it is fetched in."""

    size: int
    data_offset: int  # everything before is header: every fetching node needs it
    chunk_bytes: int
    tensors: tuple[TensorExtent, ...]

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.size < 0 or not 0 <= self.data_offset <= self.size:
            raise ValueError(f"bad layout: size {self.size}, data_offset {self.data_offset}, chunk {self.chunk_bytes}")

    def chunk_len(self, index: int) -> int:
        start = index * self.chunk_bytes
        return max(0, min(self.chunk_bytes, self.size - start))


@dataclass(frozen=True)
class Holding:
    """What one node holds of the model file: all of it, or the verified chunks in its slice cache."""

    has_file: bool = False
    chunks: frozenset[int] = frozenset()


@dataclass(frozen=True)
class WeightSources:
    """Who holds the model's weights. holder: the node that serves the file (the server's). holdings: per node
    name (a node not listed holds nothing). layout: the file's tensor ranges (None: estimate from the profile).
    links: the measured link from the holder to each node, where the holder is not in the cluster being planned
    (a re-plan on the survivors may leave it out); else the cluster's own link is used."""

    holder: str
    holdings: Mapping[str, Holding] = field(default_factory=dict)
    layout: FileLayout | None = None
    links: Mapping[str, LinkSpec] = field(default_factory=dict)

    def holding(self, node: str) -> Holding:
        return self.holdings.get(node, Holding())

    def link(self, node: str, cluster: ClusterSpec) -> LinkSpec:
        if node in self.links:
            return self.links[node]
        if self.holder in cluster.names and node in cluster.names:
            return cluster.link(self.holder, node)
        return cluster.default_link


# ---- which bytes a shard reads ---------------------------------------------------------------------------------
def shard_tensor_names(names: Iterable[str], layers: tuple[int, int], has_embedding: bool,
                       has_output: bool) -> list[str]:
    """The tensors a shard reads (llama.cpp's naming, every family): its layers' `blk.N.*`, the embedding on the
    first stage (and on the last when the head is tied to it), the head on the last stage, and the small global
    tensors (output_norm, rope_freqs, ...) everywhere."""
    names = list(names)
    tied = "output.weight" not in names
    out = []
    for name in names:
        m = _LAYER.match(name)
        if m:
            keep = layers[0] <= int(m.group(1)) < layers[1]
        elif name.startswith("token_embd."):
            keep = has_embedding or (has_output and tied)
        elif name.startswith("output."):
            keep = has_output
        else:
            keep = True
        if keep:
            out.append(name)
    return out


def extent_ranges(tensors: Iterable[TensorExtent], wanted: set[str],
                  experts: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Byte ranges of the wanted tensors; a stacked expert tensor contributes only the run of experts [start, end)."""
    out = []
    for t in tensors:
        if t.name not in wanted:
            continue
        if experts is not None and t.n_expert > 0 and _EXPERTS.search(t.name):
            per_expert = t.n_bytes // t.n_expert
            out.append((t.start + experts[0] * per_expert, t.start + experts[1] * per_expert))
        else:
            out.append((t.start, t.start + t.n_bytes))
    return out


def chunks_covering(ranges: Iterable[tuple[int, int]], size: int, data_offset: int, chunk_bytes: int) -> list[int]:
    """Indices of the chunks that cover the byte ranges, and the header's [0, data_offset)."""
    need = set(range(0, (data_offset + chunk_bytes - 1) // chunk_bytes or 1))
    for start, end in ranges:
        if end > start:
            need.update(range(start // chunk_bytes, (end - 1) // chunk_bytes + 1))
    return sorted(i for i in need if i * chunk_bytes < size)


def shard_chunks(layout: FileLayout, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                 experts: tuple[int, int] | None = None) -> list[int]:
    """The chunks of `layout` a node fetches for this shard: its tensors' and the header's."""
    wanted = set(shard_tensor_names((t.name for t in layout.tensors), layers, has_embedding, has_output))
    return chunks_covering(extent_ranges(layout.tensors, wanted, experts), layout.size, layout.data_offset,
                           layout.chunk_bytes)


def profile_shard_bytes(profile: ModelProfile, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                        experts: tuple[int, int] | None = None) -> int:
    """Without a file: the weight bytes a shard's tensors hold by the profile (whole layers, as the fetcher reads
    whole tensors; of an MoE layer only its experts), for presets and declared clusters."""
    n = layers[1] - layers[0]
    ffn_units = (experts[1] - experts[0]) if experts is not None and profile.is_moe else profile.ffn_units
    per_layer = profile.n_kv_heads * profile.attn_unit_bytes + ffn_units * profile.ffn_unit_bytes \
        + profile.layer_norm_bytes
    extra = (profile.embedding_bytes if has_embedding else 0.0) + (
        profile.head_extra_bytes(has_embedding) if has_output else 0.0)
    return int(n * per_layer + extra)


# ---- what a plan costs ------------------------------------------------------------------------------------------
def shard_roles(plan_stages: tuple[StageSpec, ...]) -> list[tuple[ShardAssignment, tuple[int, int], bool, bool]]:
    """(shard, layers, has_embedding, has_output) per shard, as PartitionPlan.shard_specs assigns the roles."""
    last = len(plan_stages) - 1
    return [(sh, st.layers, i == 0, i == last and j == 0)
            for i, st in enumerate(plan_stages) for j, sh in enumerate(st.shards)]


def node_load(node: str, layers: tuple[int, int], has_embedding: bool, has_output: bool,
              experts: tuple[int, int] | None, sources: WeightSources, cluster: ClusterSpec,
              profile: ModelProfile | None = None, need: list[int] | None = None) -> NodeLoad:
    """One shard's load cost on `node` (see NodeLoad). need: the shard's chunks (shard_chunks), when the caller
    already has them."""
    held = sources.holding(node)
    if held.has_file or node == sources.holder:
        return NodeLoad(node, "file", 0, 0.0)
    lay = sources.layout
    if lay is not None:
        if need is None:
            need = shard_chunks(lay, layers, has_embedding, has_output, experts)
        missing = [i for i in need if i not in held.chunks] if held.chunks else need
        last = (lay.size - 1) // lay.chunk_bytes  # the only chunk that may be shorter
        nbytes = len(missing) * lay.chunk_bytes - (lay.chunk_bytes - lay.chunk_len(last) if missing and
                                                   missing[-1] == last else 0)
        holds = "slice" if len(missing) < len(need) else "none"
    elif profile is not None:
        nbytes, holds = profile_shard_bytes(profile, layers, has_embedding, has_output, experts), "none"
    else:
        raise ValueError("load costs need the file's layout or the model's profile")
    seconds = sources.link(node, cluster).transfer_time(nbytes) if nbytes else 0.0
    return NodeLoad(node, holds, nbytes, seconds)


def load_costs(stages: tuple[StageSpec, ...], sources: WeightSources, cluster: ClusterSpec,
               profile: ModelProfile | None = None) -> tuple[NodeLoad, ...]:
    """Every shard's NodeLoad, in plan order."""
    return tuple(node_load(sh.node, layers, emb, out, sh.experts, sources, cluster, profile)
                 for sh, layers, emb, out in shard_roles(stages))


def fetch_seconds(loads: Iterable[NodeLoad]) -> float:
    """The plan's load time from fetching: the sum over nodes, not the maximum, because every byte leaves the one
    holder, whose own link is what the transfers share (they run at once and split it)."""
    return sum(l.fetch_s for l in loads)


def describe(loads: Iterable[NodeLoad]) -> str:
    """'node1 fetches 12.3 GB (~99.0 s)' for each fetching node, or '' when nothing is fetched."""
    parts = [f"{l.node} fetches {format_bytes(l.fetch_bytes)} (~{l.fetch_s:.1f} s"
             + (", part cached)" if l.holds == "slice" else ")") for l in loads if l.fetch_bytes]
    return "; ".join(parts)


def with_load(plan: PartitionPlan, sources: WeightSources, cluster: ClusterSpec,
              profile: ModelProfile | None = None) -> PartitionPlan:
    """`plan` carrying its load costs (PartitionPlan.load; its JSON's "load" list), its reason saying what is
    fetched."""
    loads = load_costs(plan.stages, sources, cluster, profile)
    said = describe(loads)
    reason = plan.reason if not said else f"{_sentence(plan.reason)} Load: {said}."
    return replace(plan, load=loads, reason=reason)


def _sentence(text: str) -> str:
    return text if not text or text.endswith(".") else text + "."


def _swapped(stages: tuple[StageSpec, ...], a: str, b: str) -> tuple[StageSpec, ...]:
    """The layout with nodes a and b exchanging roles (b may be unused: a's shards move to b)."""
    def swap(n: str) -> str:
        return b if n == a else a if n == b else n
    return tuple(StageSpec(st.layers, tuple(replace(sh, node=swap(sh.node)) for sh in st.shards)) for st in stages)


def prefer_holders(plan: PartitionPlan, cm: Any, sources: WeightSources, tolerance: float = 0.1) -> PartitionPlan:
    """`plan`, or a layout within `tolerance` of its predicted cost (`cm`: the CostModel it was planned with) whose
    nodes fetch less (fetch_seconds): greedy exchanges of two nodes' roles, or of a used node for an unused one,
    each fitting the nodes' memory, the best exchange first, while one lowers the fetch time. Returns the plan with
    its load costs attached (with_load)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    cluster, profile = cm.cluster, cm.profile
    base_cost = cm.evaluate(plan.stages)[1]
    limit = base_cost * (1.0 + tolerance)
    stages = plan.stages
    memo: dict[tuple[Any, ...], float] = {}
    needs: dict[tuple[Any, ...], list[int] | None] = {}

    def cost(node: str, role: tuple[Any, ...]) -> float:
        # a node's cost for a role depends on that node and role alone, and a role's chunks on the role alone:
        # each is worked out once per call (hundreds of nodes × a few roles, thousands of exchanges)
        if role not in needs:
            needs[role] = None if sources.layout is None else shard_chunks(sources.layout, *role)
        key = (node, *role)
        if key not in memo:
            memo[key] = node_load(node, *role, sources, cluster, profile, needs[role]).fetch_s
        return memo[key]

    def roles(layout: tuple[StageSpec, ...]) -> dict[str, list[tuple[Any, ...]]]:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for sh, layers, emb, last in shard_roles(layout):
            out.setdefault(sh.node, []).append((layers, emb, last, sh.experts))
        return out

    def seconds(layout: tuple[StageSpec, ...]) -> float:
        return sum(cost(n, r) for n, rs in roles(layout).items() for r in rs)

    current = seconds(stages)
    moved: list[str] = []
    names = cluster.names
    for _ in range(len(names) * max(1, len(plan.nodes))):  # each accepted exchange lowers the fetch time
        if current <= 0:
            break
        best: tuple[float, tuple[StageSpec, ...], str, str] | None = None
        held = roles(stages)
        used = list(held)
        for a in used:
            for b in names:
                if b == a or (b in held and used.index(b) < used.index(a)):
                    continue  # an exchange of two used nodes is tried once
                # the exchange's fetch time from the two nodes' costs alone, before building the layout
                delta = sum(cost(b, r) - cost(a, r) for r in held[a]) + sum(
                    cost(a, r) - cost(b, r) for r in held.get(b, ()))
                secs = current + delta
                if secs >= current - 1e-9 or (best is not None and secs >= best[0]):
                    continue
                cand = _swapped(stages, a, b)
                if cm.check_memory(cand) or cm.evaluate(cand)[1] > limit:
                    continue
                best = (secs, cand, a, b)
        if best is None:
            break
        current, stages = best[0], best[1]
        moved.append(f"{best[2]}→{best[3]}")
    if moved:
        pred = cm.evaluate(stages)[0]
        why = (f"{_sentence(plan.reason)} Prefers nodes holding the weights: {', '.join(moved)} (within "
               f"{tolerance:.0%} of the predicted {plan.predicted.decode_ms_per_token:.3f} ms/token).")
        plan = replace(plan, stages=stages, predicted=pred, reason=why)
    return with_load(plan, sources, cluster, profile)
