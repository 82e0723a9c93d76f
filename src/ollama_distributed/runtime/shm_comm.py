"""Shared-memory data paths between shards on one machine: the stage-to-stage hop, the tensor-parallel sum, and
the tokens fed back from the output rank to stage 0 (runtime/collectives.py).

Issue 15 measured gloo on loopback at ~1.3 ms per pipeline hop and ~0.5 ms per all-reduce of a decode step's few KB,
two all-reduces per layer: a 2-way tensor-parallel SmolLM2 spent 60 of its ~80 ms per token in gloo. Co-located
shards need no sockets for that: the driver (runtime/ray_executor.py) sets up, per plan, a ShmRing
(runtime/channel.py) for every stage-to-stage edge whose two ranks share a host, and one `ShmAllReduce` segment for
every stage whose shards all share a host; runtime/collectives.py PlanComm uses them in place of gloo's
send/recv and all_reduce there and keeps gloo (or NCCL) for everything across machines. This is the shape of vLLM's
custom all-reduce and shm broadcast queue: peers on one host write into a shared buffer and poll flags.

`ShmAllReduce` — one segment for p ranks: a header line per rank (published generation, consumed generation),
then two buffers of p slots each. A call takes the next generation g and buffer g mod 2:
  1. wait until every rank has consumed generation g - 2 (the last user of this buffer),
  2. copy the tensor into its own slot, then publish g (one aligned 8-byte store after the payload; x86-64 keeps
     stores in order, as ShmRing relies on),
  3. wait until every rank has published g,
  4. sum the p slots in rank order into the tensor — the same additions in the same order on every rank, so every
     shard of the stage holds a bit-identical residual stream, as after gloo's all_reduce,
  5. mark g consumed.
Tensors larger than a slot go through in slot-sized pieces, one generation each.

A peer that is SIGKILLed cannot mark anything: every wait checks, every CHECK_S, that the peers' processes are
alive (`pid_alive`), and raises PeerGone, so the step fails on the survivors — which then stay reusable for the
re-plan — instead of spinning until the driver gives up on them.
"""

from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .channel import SHM_DIR, ShmRing, Waiter, make_bell, open_bell, ring_bell

HOP_SLOTS, HOP_SLOT_BYTES = 16, 1 << 20  # 16 MiB in flight per edge: a prefill's micro-batches pass without waiting
FEED_SLOTS, FEED_SLOT_BYTES = 8, 4096  # 512 rows a slot; a larger batch's tokens take several
REDUCE_SLOT_BYTES = 1 << 20  # per rank and buffer; a larger tensor is summed a slot at a time
SUM_SPIN_S = 2e-4  # how long a rank waiting in a sum polls before it sleeps on its doorbell
_LINE = 64  # one cache line per rank's counters, so ranks don't share the line they write


class PeerGone(RuntimeError):
    """A co-located peer's process ended while this rank waited for it."""


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a SIGKILLed Ray worker stays a zombie until its raylet reaps it,
    and signal 0 still reaches a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def liveness_check(peers: dict[int, int]) -> Callable[[], None]:
    """A `check` for waits (runtime/channel.py Waiter): raises PeerGone naming the first rank whose pid is gone."""

    def check() -> None:
        for rank, pid in peers.items():
            if not pid_alive(pid):
                raise PeerGone(f"rank {rank} (pid {pid}) on this host is gone")

    return check


def shm_for_colocated() -> bool:
    """Co-located shards use shared memory unless OLLAMA_DISTRIBUTED_SHM_COMM=0 (every path on gloo, for
    measuring the difference) or there is no writable /dev/shm."""
    from .channel import shm_available

    return os.environ.get("OLLAMA_DISTRIBUTED_SHM_COMM", "1") != "0" and shm_available()


def colocated(stage_ranks: Sequence[Sequence[int]], send_to: dict[int, Sequence[int]], hosts: Sequence[Any]
              ) -> tuple[list[tuple[int, int]], list[int], list[tuple[int, int]]]:
    """Which data paths can use shared memory: the (sender, receiver) rank pairs of stage-to-stage hops whose two
    ranks are on one host, the stages whose shards are all on one host (their sum), and the (output rank, stage-0
    rank) pairs of the fed-back tokens (collectives.RankLayout.feed_to) on one host. hosts[rank]: any key equal
    exactly for processes that share a machine (the driver uses (ip, hostname))."""
    edges = [(src, dst) for src, dsts in sorted(send_to.items()) for dst in dsts if hosts[src] == hosts[dst]]
    stages = [i for i, ranks in enumerate(stage_ranks) if len(ranks) > 1 and len({hosts[r] for r in ranks}) == 1]
    out = stage_ranks[-1][0]
    feeds = [(out, r) for r in stage_ranks[0] if r != out and hosts[r] == hosts[out]]
    return edges, stages, feeds


def create_hop() -> ShmRing:
    return ShmRing.create(HOP_SLOTS, HOP_SLOT_BYTES, prefix="od-hop")


def create_feed() -> ShmRing:
    """A ring for one step's fed-back token ids (8 bytes a row; at most a few steps are ever in it)."""
    return ShmRing.create(FEED_SLOTS, FEED_SLOT_BYTES, prefix="od-feed")


# Between a stage's forward and the next one's, each torch call costs 10-20 us here: the forward has just streamed
# the shard's weights through the caches (measured: 25 us for contiguous/view/reshape/numpy of a 576-float tensor
# after touching 32 MB, 15 us for one numpy view, 5 us for the whole send when warm). So a hop goes through numpy
# wherever numpy has the dtype, and bfloat16 (which it lacks) through torch's byte view.
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def send_tensor(ring: ShmRing, t: torch.Tensor, check: Callable[[], None]) -> None:
    """One tensor's bytes as one ring message (the receiver knows shape and dtype, as with gloo's recv)."""
    if not t.is_contiguous():
        t = t.contiguous()
    ring.send(t.numpy() if t.dtype in _NUMPY else t.view(torch.uint8).reshape(-1).numpy(), check=check)


def recv_tensor(ring: ShmRing, shape: Sequence[int], dtype: torch.dtype, check: Callable[[], None]) -> torch.Tensor:
    if dtype in _NUMPY:
        arr = np.empty(tuple(shape), dtype=_NUMPY[dtype])
        out, dest = torch.from_numpy(arr), arr
    else:
        out = torch.empty(tuple(shape), dtype=dtype)
        dest = out.view(torch.uint8).reshape(-1).numpy()
    want = out.numel() * out.element_size()
    got = ring.recv_into(dest, check=check) if want else ring.recv_into(b"")
    if got != want:
        raise RuntimeError(f"hop message of {got} bytes, expected {want} for {tuple(shape)} {dtype}")
    return out


class ShmAllReduce:
    """In-place sum over the p co-located ranks of one stage (see module docstring). The driver calls
    `create(p)` and hands `spec()` to each rank, which calls `attach(spec, index, check)`."""

    def __init__(self, path: Path, ranks: int, slot_bytes: int, index: int | None, fd: int,
                 check: Callable[[], None] | None = None) -> None:
        self.path, self.ranks, self.slot_bytes, self.index = Path(path), ranks, slot_bytes, index
        self.check = check
        # one doorbell per rank (runtime/channel.py): a rank rings the others' after each store they may wait for,
        # and sleeps on its own while it waits
        self._bells = [open_bell(self._bell_path(r)) for r in range(ranks)] if index is not None else []
        self._head = ranks * _LINE
        size = self._head + 2 * ranks * slot_bytes
        self._mm = mmap.mmap(fd, size)
        os.close(fd)
        self._lines = np.frombuffer(self._mm, dtype=np.int64, count=ranks * _LINE // 8).reshape(ranks, _LINE // 8)
        self._gen = int(self._lines[index, 0]) if index is not None else 0
        self._slots: dict[tuple[int, torch.dtype], list[list[torch.Tensor]]] = {}

    @classmethod
    def create(cls, ranks: int, slot_bytes: int = REDUCE_SLOT_BYTES) -> "ShmAllReduce":
        if ranks < 2:
            raise ValueError(f"ShmAllReduce needs at least 2 ranks, got {ranks}")
        path = SHM_DIR / f"od-reduce-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, ranks * _LINE + 2 * ranks * slot_bytes)  # zero-filled: generation 0 everywhere
        for r in range(ranks):
            make_bell(Path(f"{path}.bell{r}"))
        return cls(path, ranks, slot_bytes, None, fd)

    def _bell_path(self, rank: int) -> Path:
        return Path(f"{self.path}.bell{rank}")

    @classmethod
    def attach(cls, spec: dict[str, Any], index: int, check: Callable[[], None] | None = None) -> "ShmAllReduce":
        return cls(Path(spec["path"]), spec["ranks"], spec["slot_bytes"], index, os.open(spec["path"], os.O_RDWR),
                   check)

    def spec(self) -> dict[str, Any]:
        return {"path": str(self.path), "ranks": self.ranks, "slot_bytes": self.slot_bytes}

    def unlink(self) -> None:
        for p in [self.path, *(self._bell_path(r) for r in range(self.ranks))]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def _views(self, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """[buffer][rank] slot views of this dtype (made once per dtype)."""
        key = (0, dtype)
        if key not in self._slots:
            n = self.slot_bytes // torch.empty((), dtype=dtype).element_size()
            self._slots[key] = [
                [torch.frombuffer(self._mm, dtype=dtype, count=n,
                                  offset=self._head + (b * self.ranks + r) * self.slot_bytes) for r in range(self.ranks)]
                for b in range(2)
            ]
        return self._slots[key]

    def _wait(self, column: int, at_least: int) -> None:
        # the ranks of a stage compute the same share and arrive together: spin longer before sleeping than a
        # ring's reader does (waking from select costs a VM's idle exit, ~100 µs on the test machine)
        waiter = Waiter(self.check, bells=self._bells[self.index : self.index + 1], bell_spin_s=SUM_SPIN_S)
        while int(self._lines[:, column].min()) < at_least:
            waiter.pause()

    def _ring_others(self) -> None:
        for r, fd in enumerate(self._bells):
            if r != self.index:
                ring_bell(fd)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` (a contiguous CPU tensor) over the ranks, in place; returns it."""
        assert self.index is not None, "the creator's handle does not take part"
        flat = t.view(-1)
        views = self._views(t.dtype)
        per = views[0][0].numel()
        for lo in range(0, flat.numel(), per):
            piece = flat[lo : lo + per]
            n = piece.numel()
            g = self._gen + 1
            buf = views[g % 2]
            self._wait(1, g - 2)  # every rank done reading this buffer's last use
            buf[self.index][:n].copy_(piece)
            self._lines[self.index, 0] = g  # publish (after the payload)
            self._ring_others()
            self._wait(0, g)
            torch.add(buf[0][:n], buf[1][:n], out=piece)
            for r in range(2, self.ranks):
                piece.add_(buf[r][:n])
            self._lines[self.index, 1] = g  # consumed
            self._ring_others()
            self._gen = g
        return t

    def detach(self) -> None:
        """The creator's handle: drop the mapping (the ranks keep theirs)."""
        self.close()

    def close(self) -> None:
        self._slots.clear()
        self._lines = None
        for fd in self._bells:
            os.close(fd)
        self._bells = []
        try:
            self._mm.close()
        except BufferError:  # a view still alive somewhere: the mapping goes with the process
            pass
