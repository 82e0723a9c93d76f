"""Every torch.distributed call of the runtime lives here: one world per plan, a tensor-parallel group per stage,
point-to-point sends between consecutive stages.

Ranks are numbered stage-major: stage 0's shards are ranks 0..p0-1, stage 1's follow, and so on. Inside a stage
all shards hold the same residual stream after each all-reduce, so any of them can feed the next stage: receiver j
of stage s+1 takes its input from shard j mod p_s of stage s, which spreads the sends over the senders when the
stages have different widths (e.g. 2-way TP feeding 3-way TP).

The output rank (the last stage's first shard) samples. In a step fed back (runtime/lookahead.py: sent before the
step it follows has answered) it sends what it sampled straight to stage 0's ranks (`send_feed` / `recv_feed`),
so the driver is not on the token's path from the last stage to the first.

Between ranks on one machine, the driver may hand PlanComm shared-memory paths (runtime/shm_comm.py): a ring per
stage-to-stage edge, one per feed edge, and a segment per stage whose shards share the host; those hops, feeds and
sums then skip gloo.

Backend: gloo (CPU tensors, TCP) unless every shard has a GPU, then NCCL. A GPU shard in a gloo world stages its
tensors through host memory. Collectives over a group of one return
at once (no process group is even created for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FEED_TAG = 7  # gloo tag of the fed-back tokens, apart from the hidden states' (tag 0) between the same two ranks


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits in a plan's world.

    rank/world: global rank and world size. stage: pipeline stage index; tp_rank: index within the stage.
    stage_ranks: the global ranks of every stage (same list on every rank). recv_from: the rank of the previous
    stage this rank takes hidden states from (None on stage 0). send_to: ranks of the next stage it feeds.
    """

    rank: int
    world: int
    stage: int
    tp_rank: int
    stage_ranks: tuple[tuple[int, ...], ...]
    recv_from: int | None
    send_to: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.stage_ranks)

    @property
    def tp_size(self) -> int:
        return len(self.stage_ranks[self.stage])

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.n_stages - 1

    @property
    def output_rank(self) -> int:
        """The rank that holds the output head and samples (the last stage's first shard: placement.py)."""
        return self.stage_ranks[-1][0]

    @property
    def feed_to(self) -> tuple[int, ...]:
        """Ranks this one sends its sampled tokens to for a step fed back (runtime/lookahead.py): from the output
        rank to every other rank of stage 0, which embed them; empty elsewhere."""
        return tuple(r for r in self.stage_ranks[0] if r != self.rank) if self.rank == self.output_rank else ()

    @property
    def feed_from(self) -> int | None:
        """The rank whose sampled tokens this one embeds in a step fed back: the output rank, for the ranks of
        stage 0 other than itself; else None."""
        return self.output_rank if self.is_first_stage and self.rank != self.output_rank else None


def plan_layout(stage_sizes: list[int]) -> list[RankLayout]:
    """RankLayouts of every rank for stages of the given tensor-parallel widths (see module docstring)."""
    if not stage_sizes or min(stage_sizes) < 1:
        raise ValueError(f"every stage needs at least one shard, got widths {stage_sizes}")
    ranks, start = [], 0
    for size in stage_sizes:
        ranks.append(tuple(range(start, start + size)))
        start += size
    stage_ranks = tuple(ranks)
    out = []
    for s, members in enumerate(stage_ranks):
        for t, rank in enumerate(members):
            recv = stage_ranks[s - 1][t % len(stage_ranks[s - 1])] if s > 0 else None
            send: tuple[int, ...] = ()
            if s + 1 < len(stage_ranks):
                nxt = stage_ranks[s + 1]
                send = tuple(r for j, r in enumerate(nxt) if j % len(members) == t)
            out.append(RankLayout(rank, start, s, t, stage_ranks, recv, send))
    return out


def bind_gloo_to(ip: str) -> None:
    """Make gloo use the network interface that holds `ip` (this node's Ray address).

    Left alone, gloo picks the address the machine's hostname resolves to — often 127.0.0.1 from /etc/hosts — and
    advertises it to its peers, which then cannot connect from another machine (seen with two network
    namespaces: "connectFullMesh failed ... Connection refused, remote=[127.0.0.1]"). An explicit
    GLOO_SOCKET_IFNAME set by the operator wins.
    """
    import os

    import psutil

    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    for ifname, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
            return
    log.warning("no network interface holds %s; gloo will pick one from the hostname", ip)


class PlanComm:
    """One rank's handle on the plan's process groups. Create on every rank with the same arguments."""

    def __init__(self, layout: RankLayout, master_addr: str, master_port: int, backend: str = "gloo",
                 timeout_s: float = 120.0, node_ip: str = "127.0.0.1", shm: dict | None = None) -> None:
        """shm: the shared-memory paths the driver set up for the ranks on this rank's host (runtime/shm_comm.py):
        {"peers": {rank: pid}, "send": {dst rank: ring spec}, "recv": ring spec | None, "feed_send": {dst rank: ring
        spec}, "feed_recv": ring spec | None, "reduce": segment spec | None}; those hops, feeds and this stage's sum
        then bypass gloo."""
        import torch.distributed as dist

        self.layout = layout
        self.backend = backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        bind_gloo_to(node_ip)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=layout.rank,
            world_size=layout.world,
            timeout=timedelta(seconds=timeout_s),
        )
        # new_group is collective over the whole world: every rank creates every stage's group, in stage order.
        self.tp_group = None
        for members in layout.stage_ranks:
            if len(members) > 1:
                group = dist.new_group(list(members))
                if layout.rank in members:
                    self.tp_group = group
        self._pending: list = []
        self._hop_out: dict[int, Any] = {}
        self._hop_in: Any = None
        self._feed_out: dict[int, Any] = {}
        self._feed_in: Any = None
        self._reduce: Any = None
        if shm:
            self._attach_shm(shm)

    def _attach_shm(self, shm: dict) -> None:
        from .channel import ShmRing
        from .shm_comm import ShmAllReduce, liveness_check

        self._check = liveness_check({int(r): int(pid) for r, pid in shm["peers"].items() if int(r) != self.layout.rank})
        for dst, spec in shm.get("send", {}).items():
            self._hop_out[int(dst)] = ShmRing.attach(spec["path"], spec["slots"], spec["slot_bytes"])
        if shm.get("recv"):
            spec = shm["recv"]
            self._hop_in = ShmRing.attach(spec["path"], spec["slots"], spec["slot_bytes"])
        for dst, spec in shm.get("feed_send", {}).items():
            self._feed_out[int(dst)] = ShmRing.attach(spec["path"], spec["slots"], spec["slot_bytes"])
        if shm.get("feed_recv"):
            spec = shm["feed_recv"]
            self._feed_in = ShmRing.attach(spec["path"], spec["slots"], spec["slot_bytes"])
        if shm.get("reduce"):
            members = self.layout.stage_ranks[self.layout.stage]
            self._reduce = ShmAllReduce.attach(shm["reduce"], members.index(self.layout.rank), self._check)

    @property
    def shm_paths(self) -> dict[str, int]:
        """How many of this rank's hops and sums run over shared memory (for status and tests)."""
        return {"hops_out": len(self._hop_out), "hops_in": int(self._hop_in is not None),
                "feeds_out": len(self._feed_out), "feeds_in": int(self._feed_in is not None),
                "all_reduce": int(self._reduce is not None)}

    # -- tensor parallel ----------------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over this stage's shards (in place) and return it; a one-shard stage returns `t` unchanged."""
        if self.tp_group is None:
            return t
        if self._reduce is not None and t.device.type == "cpu" and t.is_contiguous():
            return self._reduce.all_reduce(t)
        import torch.distributed as dist

        if t.device != self.device:  # a GPU shard in a gloo world: reduce a host copy
            host = t.to(self.device)
            dist.all_reduce(host, op=dist.ReduceOp.SUM, group=self.tp_group)
            t.copy_(host)
            return t
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.tp_group)
        return t

    # -- pipeline ----------------------------------------------------------------------------------------------
    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Block until the previous stage's hidden states for this micro-batch arrive."""
        import torch.distributed as dist

        assert self.layout.recv_from is not None, "stage 0 receives token ids from the driver, not hidden states"
        if self._hop_in is not None:
            from .shm_comm import recv_tensor

            return recv_tensor(self._hop_in, shape, dtype, self._check)
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src=self.layout.recv_from)
        return buf

    def send_hidden(self, t: torch.Tensor) -> None:
        """Start sending `t` to the next stage's shards without waiting (the next micro-batch can compute
        meanwhile); `flush()` waits for all outstanding sends."""
        import torch.distributed as dist

        if t.device != self.device or not t.is_contiguous():  # gloo sends host tensors; NCCL device tensors
            t = t.to(self.device).contiguous()
        for dst in self.layout.send_to:
            if dst in self._hop_out:  # copied into the ring now; waits only while the ring is full
                from .shm_comm import send_tensor

                send_tensor(self._hop_out[dst], t, self._check)
                continue
            self._pending.append((dist.isend(t, dst=dst), t))  # keep t alive until the send completes

    # -- tokens fed back from the output rank to stage 0 -------------------------------------------------------
    def send_feed(self, tokens: list[int]) -> None:
        """Send the tokens the output rank sampled for a step's rows to stage 0's other ranks (`feed_to`); every
        one of them takes them with `recv_feed` in the same step. Started without waiting, like `send_hidden`.
        Shared memory takes the numpy array as it is (no torch call: see shm_comm.py on cold calls)."""
        if not self.layout.feed_to:
            return
        import torch.distributed as dist

        arr = np.array(tokens, dtype=np.int64)
        for dst in self.layout.feed_to:
            if dst in self._feed_out:
                self._feed_out[dst].send(arr, check=self._check)
                continue
            t = torch.from_numpy(arr)
            self._pending.append((dist.isend(t, dst=dst, tag=FEED_TAG), t))

    def recv_feed(self, n: int) -> list[int]:
        """The output rank's `n` sampled tokens for this step's rows."""
        import torch.distributed as dist

        src = self.layout.feed_from
        assert src is not None, "only stage 0's ranks other than the output rank are fed"
        arr = np.empty(n, dtype=np.int64)
        if self._feed_in is not None:
            got = self._feed_in.recv_into(arr, check=self._check)
            if got != arr.nbytes:
                raise RuntimeError(f"feed of {got} bytes, expected {arr.nbytes} for {n} tokens")
        else:
            dist.recv(torch.from_numpy(arr), src=src, tag=FEED_TAG)
        return arr.tolist()

    def flush(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def destroy(self) -> None:
        import torch.distributed as dist

        self._pending.clear()
        for ch in [*self._hop_out.values(), self._hop_in, *self._feed_out.values(), self._feed_in, self._reduce]:
            if ch is not None:
                ch.close()
        self._hop_out, self._hop_in, self._reduce = {}, None, None
        self._feed_out, self._feed_in = {}, None
        if dist.is_initialized():
            dist.destroy_process_group()
