"""Measure what the planner needs to know about each node and each link, on the nodes themselves.

Per node (a probe actor pinned to it with NodeAffinitySchedulingStrategy(soft=False)):
  memory: psutil total/available on that machine, and the node's declared shard budget (`od_memory_mib`);
  memory bandwidth: a GEMV y = W x over a `gemv_bytes` fp32 matrix — decoding one token streams every weight
    once, so bytes(W) / time is the rate the cost model's "memory_bandwidth" stands for;
  FLOP/s: an n×n×n fp32 matmul, 2·n³ FLOPs (compute-bound, the prefill regime).
Per link (the two probe actors of a pair, one gloo process group over all probes):
  latency: half the round trip of a small tensor ping-pong; bandwidth: a large tensor ping-pong,
  bytes / (one-way time − latency) (the alpha-beta model the scheduler's LinkSpec uses). Two nodes on one machine
  are probed over a pair of shared-memory rings instead, the path the runtime's hops and tensor-parallel sums take
  between co-located shards (runtime/shm_comm.py), so the planner prices them at what they cost.

Nodes sharing one machine (same address) are probed one after another so they do not disturb each other's
numbers; nodes on different machines are probed in parallel. Probe actors use as many torch threads as the node
has Ray CPUs — the same rule the shard workers follow.
"""

from __future__ import annotations

import logging
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import ClusterHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeMeasurement:
    """What a probe found on one node. Bandwidth in bytes/s, flops in FLOP/s, memory in bytes."""

    name: str
    node_id: str
    address: str
    memory_total: int
    memory_available: int
    memory_budget: int | None
    memory_bandwidth: float
    flops: float
    threads: int
    device: str

    @property
    def usable_memory(self) -> int:
        """Bytes a plan may put on this node: its declared budget, capped by what the machine has free."""
        if self.memory_budget is None:
            return self.memory_available
        return min(self.memory_budget, self.memory_available)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), usable_memory=self.usable_memory)


@dataclass(frozen=True)
class LinkMeasurement:
    """One-way latency (s) and bandwidth (bytes/s) between nodes a and b, measured with gloo send/recv."""

    a: str
    b: str
    latency: float
    bandwidth: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClusterMeasurement:
    nodes: tuple[NodeMeasurement, ...]
    links: tuple[LinkMeasurement, ...]

    def node(self, name: str) -> NodeMeasurement:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no measurement for node {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [n.to_dict() for n in self.nodes], "links": [l.to_dict() for l in self.links]}


class _Probe:
    """Runs on one node; see module docstring. A plain class, wrapped by ray.remote in `measure_cluster`."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.threads = torch.get_num_threads()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def node_probe(self, gemv_bytes: int, matmul_n: int, repeats: int) -> dict[str, Any]:
        import psutil
        import torch

        vm = psutil.virtual_memory()
        dev = torch.device(self.device)
        n = max(64, int((gemv_bytes / 4) ** 0.5))
        w = torch.randn(n, n, device=dev)
        x = torch.randn(n, device=dev)
        gemv = _best_time(lambda: torch.mv(w, x), repeats, dev)
        del w, x
        a = torch.randn(matmul_n, matmul_n, device=dev)
        b = torch.randn(matmul_n, matmul_n, device=dev)
        mm = _best_time(lambda: a @ b, repeats, dev)
        return {
            "memory_total": int(vm.total),
            "memory_available": int(vm.available),
            "memory_bandwidth": n * n * 4 / gemv,
            "flops": 2.0 * matmul_n**3 / mm,
            "threads": self.threads,
            "device": self.device,
        }

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind((_node_ip(), 0))
            return s.getsockname()[1]

    def ip(self) -> str:
        return _node_ip()

    def init_group(self, master: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        from .collectives import bind_gloo_to

        bind_gloo_to(_node_ip())
        dist.init_process_group(
            "gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )

    def link_probe(self, peer: int, first: bool, small_iters: int, big_bytes: int, big_iters: int) -> tuple[float, float]:
        """Ping-pong with `peer` over gloo; the `first` side sends first. Returns (latency s, bandwidth bytes/s)."""
        import torch.distributed as dist

        def send(t):
            dist.send(t, peer)

        def recv(t):
            dist.recv(t, peer)
            return t

        return _alpha_beta(send, recv, first, small_iters, big_bytes, big_iters)

    def shm_link_probe(self, out_spec: dict, in_spec: dict, first: bool, small_iters: int, big_bytes: int,
                       big_iters: int) -> tuple[float, float]:
        """`link_probe` over a pair of shared-memory rings: the path the runtime's hops and sums take between
        shards on one machine (runtime/shm_comm.py), so the planner prices co-located hops at what they cost."""
        from .channel import ShmRing
        from .shm_comm import recv_tensor, send_tensor

        out = ShmRing.attach(out_spec["path"], out_spec["slots"], out_spec["slot_bytes"])
        inp = ShmRing.attach(in_spec["path"], in_spec["slots"], in_spec["slot_bytes"])
        try:
            return _alpha_beta(lambda t: send_tensor(out, t, _no_check),
                               lambda t: recv_tensor(inp, t.shape, t.dtype, _no_check),
                               first, small_iters, big_bytes, big_iters)
        finally:
            out.detach()
            inp.detach()

    def destroy(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _no_check() -> None:
    pass


def _alpha_beta(send, recv, first: bool, small_iters: int, big_bytes: int, big_iters: int) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) from ping-pongs through `send(t)` / `recv(t) -> t`; the `first` side sends
    first. Latency: half the median round trip of 1 KiB (a decode step's hidden state is a few KiB); bandwidth:
    a `big_bytes` tensor's one-way time less that latency (the alpha-beta model of scheduler LinkSpec)."""
    import torch

    def pingpong(t: torch.Tensor, iters: int) -> float:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            if first:
                send(t)
                t = recv(t)
            else:
                t = recv(t)
                send(t)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / 2  # one way

    small = torch.zeros(256)
    pingpong(small, 3)  # connect + warm up
    latency = pingpong(small, small_iters)
    big = torch.zeros(max(1, big_bytes // 4))
    one_way = pingpong(big, big_iters)
    return latency, big.numel() * 4 / max(one_way - latency, 1e-9)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _best_time(fn, repeats: int, dev) -> float:
    import torch

    fn()  # warm up (page in, thread pool)
    best = float("inf")
    for _ in range(max(1, repeats)):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cluster(
    cluster: "ClusterHandle",
    *,
    gemv_bytes: int = 64 * 1024 * 1024,
    matmul_n: int = 512,
    repeats: int = 5,
    link_small_iters: int = 20,
    link_big_bytes: int = 4 * 1024 * 1024,
    link_big_iters: int = 3,
    timeout_s: float = 120.0,
) -> ClusterMeasurement:
    """Probe every alive node and every node pair of `cluster` (see module docstring)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .shm_comm import create_hop, shm_for_colocated

    nodes = cluster.nodes()
    probe_cls = ray.remote(_Probe)
    actors = [
        probe_cls.options(
            num_cpus=0,
            num_gpus=min(1.0, n.gpus),
            scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False),
        ).remote(max(1, int(n.cpus)))
        for n in nodes
    ]
    try:
        placed = ray.get([a.node_id.remote() for a in actors], timeout=timeout_s)
        for n, got in zip(nodes, placed):
            assert got == n.node_id, f"probe for {n.name} ran on {got}"
        # Same machine: one after another; different machines: in parallel (one "wave" per index per host).
        by_host: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            by_host.setdefault(n.address, []).append(i)
        results: dict[int, dict] = {}
        for wave in range(max(len(v) for v in by_host.values())):
            idx = [v[wave] for v in by_host.values() if wave < len(v)]
            refs = [actors[i].node_probe.remote(gemv_bytes, matmul_n, repeats) for i in idx]
            for i, r in zip(idx, ray.get(refs, timeout=timeout_s)):
                results[i] = r
        node_ms = tuple(
            NodeMeasurement(
                name=n.name,
                node_id=n.node_id,
                address=n.address,
                memory_total=results[i]["memory_total"],
                memory_available=results[i]["memory_available"],
                memory_budget=n.memory_budget,
                memory_bandwidth=results[i]["memory_bandwidth"],
                flops=results[i]["flops"],
                threads=results[i]["threads"],
                device=results[i]["device"],
            )
            for i, n in enumerate(nodes)
        )
        links: list[LinkMeasurement] = []
        if len(actors) > 1:
            master = ray.get(actors[0].ip.remote())
            port = ray.get(actors[0].free_port.remote())
            ray.get([a.init_group.remote(master, port, r, len(actors), timeout_s) for r, a in enumerate(actors)], timeout=timeout_s)
            shm = shm_for_colocated()
            for i in range(len(actors)):
                for j in range(i + 1, len(actors)):
                    args = (link_small_iters, link_big_bytes, link_big_iters)
                    rings = []
                    if shm and nodes[i].address == nodes[j].address:  # the runtime's co-located path
                        rings = [create_hop(), create_hop()]
                        ri = actors[i].shm_link_probe.remote(rings[0].spec(), rings[1].spec(), True, *args)
                        rj = actors[j].shm_link_probe.remote(rings[1].spec(), rings[0].spec(), False, *args)
                    else:
                        ri = actors[i].link_probe.remote(j, True, *args)
                        rj = actors[j].link_probe.remote(i, False, *args)
                    try:
                        (lat, bw), _ = ray.get([ri, rj], timeout=timeout_s)
                    finally:
                        for ring in rings:
                            ring.unlink()
                            ring.detach()
                    links.append(LinkMeasurement(nodes[i].name, nodes[j].name, lat, bw))
            ray.get([a.destroy.remote() for a in actors], timeout=timeout_s)
        out = ClusterMeasurement(node_ms, tuple(links))
        log.info("measured %d node(s), %d link(s)", len(node_ms), len(links))
        return out
    finally:
        for a in actors:
            ray.kill(a)


# The runtime's fixed time per decode step (scheduler/cluster.py StepOverhead), measured by
# bench/overhead_bench.py on the 2-core test machine (tiny model through the engine and the Ray executor, 1-3
# pipeline stages, 1 and 4 sequences; fit of measured = a·compute + o_step + k·o_stage + b·o_seq): 1.8-2.4 ms per
# step and 0.9-1.0 ms per sequence (sampling over the vocabulary, stop checks, streaming). The per-stage term is
# 0-1.3 ms depending on how much of each hop's fixed cost the probed link latency (same Ray/gloo path) already
# holds: 0 when probed under load, 1.3 ms when probed on an idle machine. It is left at 0 here (the link probe
# is part of every measured cluster) and learnt by calibration (scheduler/calibration.py) from the server's own
# reports when they come from plans with different stage counts.
# Issue 15 (resident step loops fed through shared memory, sampling on the last stage) cut these; the same bench
# in one session, same load: 1 stage batch 1 5.26 -> 2.05 ms/token, 2 stages 6.7-7.6 -> 2.8, 1 stage batch 4
# 8.3 -> 3.3; fit before o_step 1.35 / o_stage 1.96 / o_seq 1.22 ms, after 0 / 1.0 / 0.59 ms (scale 0.5). The
# per-stage part stays with the link probe as above, so the defaults move to ~1.0 ms per step (the after-fit's
# o_stage of a one-stage plan) and 0.6 ms per sequence.
def _ray_step_overhead() -> Any:
    from ..scheduler.cluster import StepOverhead

    return StepOverhead(step_s=1.0e-3, stage_s=0.0, seq_s=0.6e-3)


RAY_STEP_OVERHEAD = _ray_step_overhead()


def to_cluster_spec(measurement: ClusterMeasurement, declared: Any = None):
    """The scheduler's ClusterSpec with measured values; `declared` (a ClusterSpec) fills what was not measured.

    Nodes are the measured ones (a plan can only use nodes that exist); a declared node of the same name lends
    nothing, since every field is measured — it is kept only for nodes whose probe produced no number (≤ 0).
    The default link is the slowest measured one (conservative for pairs added later). The overhead is the
    declared one when given, else RAY_STEP_OVERHEAD.
    """
    from ..scheduler.cluster import DEFAULT_LINK, ClusterSpec, LinkSpec, NodeSpec, StepOverhead

    declared_nodes = {n.name: n for n in declared.nodes} if declared is not None else {}
    nodes = []
    for m in measurement.nodes:
        d = declared_nodes.get(m.name)
        bw = m.memory_bandwidth if m.memory_bandwidth > 0 else (d.memory_bandwidth if d else 1e9)
        fl = m.flops if m.flops > 0 else (d.flops if d else 1e9)
        nodes.append(NodeSpec(m.name, int(m.usable_memory), float(bw), float(fl)))
    links = {(l.a, l.b): LinkSpec(max(l.latency, 0.0), max(l.bandwidth, 1.0)) for l in measurement.links}
    default = declared.default_link if declared is not None else DEFAULT_LINK
    if links:
        slow = max(links.values(), key=lambda l: l.transfer_time(64 * 1024))
        default = slow
    overhead = declared.overhead if declared is not None and declared.overhead != StepOverhead() else RAY_STEP_OVERHEAD
    return ClusterSpec(tuple(nodes), default, links, overhead)
