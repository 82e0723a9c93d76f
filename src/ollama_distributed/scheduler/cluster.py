"""The machines a plan may use and the links between them.

Declared values come from cluster.yaml; the runtime replaces them with measured ones
(`ClusterSpec.with_measurements`). Links are symmetric; a pair without an override uses the default link;
a node talking to itself costs nothing. `overhead` is the runtime's fixed cost per step and per stage (see
StepOverhead), zero unless declared or measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .errors import ClusterSpecError
from .units import parse_bandwidth, parse_bytes, parse_duration, parse_flops


@dataclass(frozen=True)
class NodeSpec:
    """One machine.

    name: unique id. memory_bytes: bytes usable for weights + KV cache. memory_bandwidth: bytes/s the
    node streams weights at. flops: sustained FLOP/s in the compute dtype.
    """

    name: str
    memory_bytes: int
    memory_bandwidth: float
    flops: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ClusterSpecError("a node needs a non-empty name")
        if self.memory_bytes < 0:
            raise ClusterSpecError(f"node {self.name!r}: memory must be >= 0, got {self.memory_bytes}")
        if self.memory_bandwidth <= 0 or self.flops <= 0:
            raise ClusterSpecError(
                f"node {self.name!r}: memory_bandwidth ({self.memory_bandwidth}) and flops ({self.flops}) must be > 0")

    @property
    def hardware(self) -> tuple[int, float, float]:
        return (self.memory_bytes, self.memory_bandwidth, self.flops)


@dataclass(frozen=True)
class LinkSpec:
    """A network path: one-way latency (s) and bandwidth (bytes/s)."""

    latency: float
    bandwidth: float

    def __post_init__(self) -> None:
        if self.latency < 0 or self.bandwidth <= 0:
            raise ClusterSpecError(f"link needs latency >= 0 and bandwidth > 0, got {self.latency}, {self.bandwidth}")

    def transfer_time(self, nbytes: float) -> float:
        """Alpha-beta model (Hockney 1994): latency + bytes / bandwidth."""
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class StepOverhead:
    """Fixed time of one decode step that no roofline term sees: the runtime's own work, independent of the
    model's size.

    step_s: once per step — the engine's batching, the driver's call into the runtime and the result coming
      back. stage_s: once per pipeline stage — its worker's task dispatch and the bookkeeping of receiving and
      sending activations. seq_s: once per sequence in the step — sampling, stop checks, detokenising and
      streaming its token. All zero for a declared cluster; the runtime measures them (runtime/measure.py
      RAY_STEP_OVERHEAD) and calibration refits them (scheduler/calibration.py).
    """

    step_s: float = 0.0
    stage_s: float = 0.0
    seq_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("step_s", "stage_s", "seq_s"):
            v = getattr(self, name)
            if not (v >= 0 and v != float("inf")):
                raise ClusterSpecError(f"overhead {name} must be a finite number >= 0, got {v}")

    def total(self, stages: int, batch: int = 1) -> float:
        """Overhead of one step of `batch` sequences through `stages` pipeline stages."""
        return self.step_s + stages * self.stage_s + batch * self.seq_s


NO_OVERHEAD = StepOverhead()
LOCAL_LINK = LinkSpec(0.0, float("inf"))
DEFAULT_LINK = LinkSpec(latency=2e-4, bandwidth=125e6)  # 0.2 ms, 1 Gbit/s Ethernet


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes plus links. `link_overrides` maps an unordered node pair (sorted tuple) to its link. `overhead`:
    the runtime's fixed per-step and per-stage time (StepOverhead)."""

    nodes: tuple[NodeSpec, ...]
    default_link: LinkSpec = DEFAULT_LINK
    link_overrides: Mapping[tuple[str, str], LinkSpec] = field(default_factory=dict)
    overhead: StepOverhead = NO_OVERHEAD

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ClusterSpecError("a cluster needs at least one node")
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ClusterSpecError(f"duplicate node names: {', '.join(dup)}")
        norm: dict[tuple[str, str], LinkSpec] = {}
        known = set(names)
        for (a, b), link in dict(self.link_overrides).items():
            for n in (a, b):
                if n not in known:
                    raise ClusterSpecError(f"link {a}-{b} names unknown node {n!r}; nodes: {', '.join(names)}")
            if a == b:
                raise ClusterSpecError(f"link {a}-{b} joins a node to itself")
            norm[_pair(a, b)] = link
        object.__setattr__(self, "link_overrides", norm)
        by_name: dict[str, NodeSpec] = {n.name: n for n in self.nodes}
        object.__setattr__(self, "_by_name", by_name)

    # --- queries --------------------------------------------------------------------------------------
    def node(self, name: str) -> NodeSpec:
        by_name: dict[str, NodeSpec] = getattr(self, "_by_name")
        found = by_name.get(name)
        if found is None:
            raise ClusterSpecError(f"unknown node {name!r}")
        return found

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def link(self, a: str, b: str) -> LinkSpec:
        if a == b:
            return LOCAL_LINK
        return self.link_overrides.get(_pair(a, b), self.default_link)

    def links_uniform(self, names: list[str] | None = None) -> bool:
        """True when every pair among `names` (default: all nodes) uses the same link."""
        if not self.link_overrides:
            return True
        sel = set(self.names if names is None else names)
        return all(link == self.default_link for (a, b), link in self.link_overrides.items()
                   if a in sel and b in sel)

    @property
    def total_memory(self) -> int:
        return sum(n.memory_bytes for n in self.nodes)

    def subset(self, names: list[str]) -> "ClusterSpec":
        keep = set(names)
        return ClusterSpec(tuple(n for n in self.nodes if n.name in keep), self.default_link,
                           {p: l for p, l in self.link_overrides.items() if p[0] in keep and p[1] in keep},
                           self.overhead)

    def with_measurements(self, nodes: Mapping[str, Mapping[str, float]] | None = None,
                          links: Mapping[tuple[str, str], LinkSpec] | None = None) -> "ClusterSpec":
        """A copy where measured values replace declared ones.

        nodes: {name: {"memory_bytes"|"memory_bandwidth"|"flops": value}} (any subset of fields);
        links: {(a, b): LinkSpec} measured between two nodes. Unknown names raise ClusterSpecError.
        """
        new_nodes = list(self.nodes)
        for name, fields in (nodes or {}).items():
            idx = next((i for i, n in enumerate(new_nodes) if n.name == name), None)
            if idx is None:
                raise ClusterSpecError(f"measurement for unknown node {name!r}")
            bad = set(fields) - {"memory_bytes", "memory_bandwidth", "flops"}
            if bad:
                raise ClusterSpecError(f"unknown measured field(s) {sorted(bad)} for node {name!r}")
            kw: dict[str, Any] = dict(fields)
            if "memory_bytes" in kw:
                kw["memory_bytes"] = int(kw["memory_bytes"])
            new_nodes[idx] = replace(new_nodes[idx], **kw)
        overrides = dict(self.link_overrides)
        for (a, b), link in (links or {}).items():
            overrides[_pair(a, b)] = link
        return ClusterSpec(tuple(new_nodes), self.default_link, overrides, self.overhead)

    # --- YAML / JSON ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClusterSpec":
        """From the cluster.yaml shape:
        nodes: [{name, memory: "8GB", memory_bandwidth: "100GB/s", flops: "2TFLOPS"}]
        links: {default: {latency: "0.2ms", bandwidth: "1Gbit/s"}, "a-b": {latency, bandwidth}}
        overhead: {step: "1.5ms", stage: "0.4ms", seq: "0.3ms"} (optional; StepOverhead)
        A link key is two node names joined by "-" (or a list [a, b] in a `pairs` list)."""
        if not isinstance(data, Mapping) or "nodes" not in data:
            raise ClusterSpecError("cluster description needs a 'nodes' list")
        raw_nodes = data["nodes"]
        if not isinstance(raw_nodes, list) or not raw_nodes:
            raise ClusterSpecError("'nodes' must be a non-empty list")
        nodes = []
        for i, rn in enumerate(raw_nodes):
            if not isinstance(rn, Mapping):
                raise ClusterSpecError(f"nodes[{i}] must be a mapping, got {rn!r}")
            missing = [k for k in ("name", "memory", "memory_bandwidth", "flops") if k not in rn]
            if missing:
                raise ClusterSpecError(f"nodes[{i}] ({rn.get('name', '?')}) lacks {', '.join(missing)}")
            try:
                nodes.append(NodeSpec(str(rn["name"]), parse_bytes(rn["memory"]),
                                      parse_bandwidth(rn["memory_bandwidth"]), parse_flops(rn["flops"])))
            except ValueError as exc:
                raise ClusterSpecError(f"node {rn['name']!r}: {exc}") from None
        names = [n.name for n in nodes]
        links = data.get("links") or {}
        if not isinstance(links, Mapping):
            raise ClusterSpecError("'links' must be a mapping")
        default = DEFAULT_LINK
        overrides: dict[tuple[str, str], LinkSpec] = {}
        for key, raw in links.items():
            link = _parse_link(str(key), raw)
            if key == "default":
                default = link
            else:
                overrides[_split_pair(str(key), names)] = link
        raw_over = data.get("overhead") or {}
        if not isinstance(raw_over, Mapping) or set(raw_over) - {"step", "stage", "seq"}:
            raise ClusterSpecError(f"'overhead' must be a mapping with keys step, stage, seq, got {raw_over!r}")
        try:
            overhead = StepOverhead(*(parse_duration(raw_over.get(k, 0)) for k in ("step", "stage", "seq")))
        except ValueError as exc:
            raise ClusterSpecError(f"overhead: {exc}") from None
        return cls(tuple(nodes), default, overrides, overhead)

    def to_dict(self) -> dict[str, Any]:
        def ld(l: LinkSpec) -> dict[str, float]:
            return {"latency": l.latency, "bandwidth": l.bandwidth}
        out: dict[str, Any] = {
            "nodes": [{"name": n.name, "memory": n.memory_bytes, "memory_bandwidth": n.memory_bandwidth,
                       "flops": n.flops} for n in self.nodes],
            "links": {"default": ld(self.default_link)},
        }
        for (a, b), l in self.link_overrides.items():
            out["links"][f"{a}-{b}"] = ld(l)
        if self.overhead != NO_OVERHEAD:
            out["overhead"] = {"step": self.overhead.step_s, "stage": self.overhead.stage_s,
                               "seq": self.overhead.seq_s}
        return out


def _parse_link(key: str, raw: Any) -> LinkSpec:
    if not isinstance(raw, Mapping) or "latency" not in raw or "bandwidth" not in raw:
        raise ClusterSpecError(f"link {key!r} needs 'latency' and 'bandwidth'")
    try:
        return LinkSpec(parse_duration(raw["latency"]), parse_bandwidth(raw["bandwidth"]))
    except ValueError as exc:
        raise ClusterSpecError(f"link {key!r}: {exc}") from None


def _split_pair(key: str, names: list[str]) -> tuple[str, str]:
    """'a-b' -> (a, b), resolving names that themselves contain '-' against the node list."""
    known = set(names)
    splits = [(key[:i], key[i + 1:]) for i, ch in enumerate(key) if ch == "-"]
    found = [s for s in splits if s[0] in known and s[1] in known]
    if len(found) != 1:
        why = "matches no node pair" if not found else "is ambiguous"
        raise ClusterSpecError(f"link key {key!r} {why}; write it as '<node>-<node>' with names from: "
                               f"{', '.join(names)}")
    return found[0]
