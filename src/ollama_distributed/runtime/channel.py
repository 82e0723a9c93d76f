"""Step channels between the driver and a shard's resident step loop (worker.py `serve`): one message per step
each way, without a Ray call per token.

Two kinds, one interface (`send(bytes)`, `recv(timeout) -> bytes | None`, `close()`):

* `ShmRing` — the driver and the shard run on the same machine: a single-producer single-consumer ring of
  fixed-size slots in a memory-mapped file under /dev/shm. The same shape as vLLM's shm broadcast queue
  (vllm/distributed/device_communicators/shm_broadcast.py: a ring of chunks in shared memory, each with a
  "written" mark the reader polls, and a reader mark the writer polls before reusing a chunk), cut down to one
  reader, since the driver keeps one ring per shard and a dead shard then blocks only its own ring.
  A waiting side spins briefly (a decode step's reply usually arrives within it) and then sleeps in short,
  growing naps, so an idle shard costs almost no CPU — there is no futex to block on from Python.
  Publication order: the payload and its length are written before the slot's sequence number (a separate,
  aligned 8-byte store — never in one copy with the length, whose bytes could then land after it), and Python
  performs the stores in program order; x86-64 keeps stores in order (TSO), which is what makes the reader's
  check of the sequence number sufficient there.
* `SocketChannel` — the shard is on another machine: a TCP connection (multiprocessing.connection: length-
  prefixed frames, HMAC handshake with a per-executor key).

A message larger than a slot is split over consecutive slots; the reader joins them.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

SHM_DIR = Path("/dev/shm")
_SLOT_HEADER = struct.Struct("<qqq")  # payload bytes in this slot, 1 if more slots follow, sequence number
_SLOT_LEN = struct.Struct("<qq")  # the first two, written before the sequence number that publishes them
_SEQ_AT = 16  # offset of the sequence number in a slot header
_RING_HEADER = struct.Struct("<qq")  # read sequence (the reader's mark), closed flag
_HEADER_BYTES = 64  # the ring header gets its own cache line


CHECK_S = 0.05  # how often a waiting side runs its `check` (a peer's liveness: runtime/shm_comm.py pid_alive)


class ChannelClosed(RuntimeError):
    """The other side closed the channel."""


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class Waiter:
    """`pause()` between polls of a condition. With doorbells (`bells`: file descriptors that become readable when
    the condition may have changed, see ShmRing) it spins for `bell_spin_s`, then sleeps in the kernel until a
    bell rings (select), so a waiting process costs no CPU — on a machine with fewer cores than shard processes
    (`serve --local-nodes N` on a laptop) spinning waiters would take the cores from the one stage computing —
    and wakes within tens of µs of the bell. Without bells: spin_s of busy polls (yielding the core to any runnable
    thread), then short naps of `nap_s` for the rest of `short_s`, then naps that double up to max_nap_s."""

    def __init__(self, check: Callable[[], None] | None = None, spin_s: float = 2e-4, nap_s: float = 5e-5,
                 short_s: float = 0.05, max_nap_s: float = 1e-3, bells: Sequence[int] = (),
                 sockets: Sequence[int] = (), bell_spin_s: float = 2e-5) -> None:
        now = time.perf_counter()
        self.bells = list(bells)
        self.fds = self.bells + list(sockets)  # sockets: waited on, never drained (their bytes are messages)
        self.spin_until = now + (bell_spin_s if self.fds else spin_s)
        self.short_until = now + short_s
        self.nap = nap_s
        self.max_nap = max_nap_s
        self.check = check  # called every CHECK_S of waiting (it raises to give up)
        self.next_check = now + CHECK_S

    def pause(self) -> None:
        now = time.perf_counter()
        if now >= self.next_check:  # (advanced with or without a check: it also bounds the select below)
            if self.check is not None:
                self.check()
            self.next_check = now + CHECK_S
        if now < self.spin_until:
            os.sched_yield()
            return
        if self.fds:
            # the bound covers a bell that cannot ring (a peer killed mid-message: `check` then notices)
            ready, _, _ = select.select(self.fds, [], [], max(0.0, min(CHECK_S, self.next_check - now)))
            for fd in ready:
                if fd in self.bells:
                    drain_bell(fd)
            return
        time.sleep(self.nap)
        if now >= self.short_until:
            self.nap = min(self.nap * 2, self.max_nap)


def open_bell(path: str | Path) -> int:
    """A doorbell: a FIFO opened read-write (so opening never blocks on the other side, as it would for a plain
    reader or writer) and non-blocking. `ring_bell` writes a byte, a waiter selects on it and drains it."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


def ring_bell(fd: int) -> None:
    try:
        os.write(fd, b"\1")
    except (BlockingIOError, OSError):  # full (the waiter has plenty to wake it) or closed
        pass


def drain_bell(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def make_bell(path: Path) -> None:
    os.mkfifo(path, 0o600)


class ShmRing:
    """One direction of a shared-memory channel (see module docstring). The creator (the driver) calls
    `ShmRing.create()`, the other process `ShmRing.attach(path)`; either side may write or read, but each ring has
    exactly one writer and one reader."""

    def __init__(self, path: Path, slots: int, slot_bytes: int, fd: int) -> None:
        self.path = Path(path)
        # the doorbell: rung after each slot is published, so a reader may sleep in select instead of polling
        self._bell = open_bell(self.bell_path)
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._stride = _SLOT_HEADER.size + slot_bytes
        size = _HEADER_BYTES + slots * self._stride
        self._mm = mmap.mmap(fd, size)
        os.close(fd)
        self._buf = memoryview(self._mm)
        self._write_seq = 0  # writer: sequence number of the last slot written
        self._read_seq = 0  # reader: sequence number of the last slot consumed

    @classmethod
    def create(cls, slots: int = 8, slot_bytes: int = 256 * 1024, prefix: str = "od-step") -> "ShmRing":
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"ShmRing needs slots >= 1 and slot_bytes >= 1, got {slots}, {slot_bytes}")
        path = SHM_DIR / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, _HEADER_BYTES + slots * (_SLOT_HEADER.size + slot_bytes))  # zero-filled
        make_bell(Path(f"{path}.bell"))
        return cls(path, slots, slot_bytes, fd)

    @property
    def bell_path(self) -> Path:
        return Path(f"{self.path}.bell")

    @property
    def bell(self) -> int:
        """The reader's doorbell descriptor (for a Waiter over several rings)."""
        return self._bell

    @classmethod
    def attach(cls, path: str | Path, slots: int, slot_bytes: int) -> "ShmRing":
        return cls(Path(path), slots, slot_bytes, os.open(path, os.O_RDWR))

    def spec(self) -> dict[str, Any]:
        """What the other process needs to `attach`."""
        return {"kind": "shm", "path": str(self.path), "slots": self.slots, "slot_bytes": self.slot_bytes}

    def unlink(self) -> None:
        """Remove the files (both mappings and doorbells stay valid); the creator calls this once the peer has
        attached."""
        for p in (self.path, self.bell_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    # -- writer ------------------------------------------------------------------------------------------------
    def send(self, data: Any, timeout: float | None = None, check: Callable[[], None] | None = None) -> bool:
        """Write one message (any contiguous buffer); False when the reader did not free a slot within `timeout`
        (None: wait forever). `check` is called every CHECK_S of waiting and may raise (e.g. the peer process
        died: a SIGKILLed peer cannot mark the ring closed)."""
        view = memoryview(data).cast("B")
        deadline = None if timeout is None else time.monotonic() + timeout
        start = 0
        while True:
            chunk = view[start : start + self.slot_bytes]
            more = start + len(chunk) < len(view)
            seq = self._write_seq + 1
            waiter = Waiter(check)
            # the slot is free once the reader consumed the message that used it `slots` messages ago
            while self._mark()[0] < seq - self.slots:
                if self._mark()[1]:
                    raise ChannelClosed(f"{self.path.name}: the reader closed the channel")
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                waiter.pause()
            at = _HEADER_BYTES + ((seq - 1) % self.slots) * self._stride
            body = at + _SLOT_HEADER.size
            self._buf[body : body + len(chunk)] = chunk
            # publish: payload and length first, the sequence number (one aligned 8-byte store) last
            _SLOT_LEN.pack_into(self._buf, at, len(chunk), int(more))
            struct.pack_into("<q", self._buf, at + _SEQ_AT, seq)
            self._write_seq = seq
            ring_bell(self._bell)  # after the publish: a reader that drained the bell before re-checks after
            start += len(chunk)
            if not more:
                return True

    # -- reader ------------------------------------------------------------------------------------------------
    def poll(self) -> bool:
        """A message (its first slot) is ready to read."""
        return self._slot_seq(self._read_seq + 1) == self._read_seq + 1

    def recv(self, timeout: float | None = None, check: Callable[[], None] | None = None) -> bytes | None:
        """The next message, or None when none arrived within `timeout` (None: wait forever; 0: don't wait);
        `check` as in `send`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            # a message's later slots always follow, so only its first slot may give up
            slot = self._next_slot(check, deadline if not parts else None)
            if slot is None:
                return None
            body, n, more = slot
            parts.append(bytes(self._buf[body : body + n]))
            self._consumed()
            if not more:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def recv_into(self, dest: Any, check: Callable[[], None] | None = None) -> int:
        """The next message copied straight into `dest` (a writable buffer at least its size: no intermediate
        bytes, for large tensors); returns its length. Waits forever (`check` as in `send`)."""
        out = memoryview(dest).cast("B")
        got = 0
        while True:
            body, n, more = self._next_slot(check, None)
            if got + n > len(out):
                raise ValueError(f"{self.path.name}: message longer than the {len(out)}-byte destination")
            out[got : got + n] = self._buf[body : body + n]
            got += n
            self._consumed()
            if not more:
                return got

    def _next_slot(self, check: Callable[[], None] | None, deadline: float | None) -> tuple[int, int, bool] | None:
        """Wait for the next slot to be published: (payload offset, payload bytes, more slots follow), or None at
        the deadline (None: no deadline)."""
        seq = self._read_seq + 1
        waiter = Waiter(check, bells=(self._bell,))
        while self._slot_seq(seq) != seq:
            if self._mark()[1]:
                raise ChannelClosed(f"{self.path.name}: the writer closed the channel")
            if deadline is not None and time.monotonic() >= deadline:
                return None
            waiter.pause()
        at = _HEADER_BYTES + ((seq - 1) % self.slots) * self._stride
        n, more, _ = _SLOT_HEADER.unpack_from(self._buf, at)
        return at + _SLOT_HEADER.size, n, bool(more)

    def _consumed(self) -> None:
        """Free the slot just read for the writer."""
        self._read_seq += 1
        struct.pack_into("<q", self._buf, 0, self._read_seq)

    def _slot_seq(self, seq: int) -> int:
        return struct.unpack_from("<q", self._buf, _HEADER_BYTES + ((seq - 1) % self.slots) * self._stride + _SEQ_AT)[0]

    def _mark(self) -> tuple[int, int]:
        return _RING_HEADER.unpack_from(self._buf, 0)

    def detach(self) -> None:
        """Drop this mapping without telling the other side (a creator that only set the ring up for two others)."""
        if not self._mm.closed:
            self._buf.release()
            self._mm.close()
            os.close(self._bell)

    def close(self) -> None:
        """Tell the other side (its waits raise ChannelClosed) and drop this mapping."""
        if self._mm.closed:
            return
        try:
            struct.pack_into("<q", self._buf, 8, 1)
        except ValueError:
            pass
        ring_bell(self._bell)  # a reader asleep on it wakes and sees the flag
        self._buf.release()
        self._mm.close()
        os.close(self._bell)


class SocketChannel:
    """Both directions of a TCP channel to a shard on another machine (see module docstring)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @classmethod
    def listen(cls, host: str, authkey: bytes) -> Any:
        from multiprocessing.connection import Listener

        return Listener((host, 0), authkey=authkey)

    @classmethod
    def connect(cls, address: tuple[str, int], authkey: bytes) -> "SocketChannel":
        from multiprocessing.connection import Client

        return cls(Client(tuple(address), authkey=authkey))

    def send(self, data: bytes, timeout: float | None = None) -> bool:
        try:
            self._conn.send_bytes(data)
        except (OSError, EOFError) as exc:
            raise ChannelClosed(f"step channel: {exc}") from exc
        return True

    def fileno(self) -> int:
        return self._conn.fileno()

    def poll(self) -> bool:
        try:
            return self._conn.poll(0)
        except (OSError, EOFError) as exc:
            raise ChannelClosed(f"step channel: {exc}") from exc

    def recv(self, timeout: float | None = None) -> bytes | None:
        try:
            if timeout is not None and not self._conn.poll(timeout):
                return None
            return self._conn.recv_bytes()
        except (OSError, EOFError) as exc:
            raise ChannelClosed(f"step channel: {exc}") from exc

    def close(self) -> None:
        try:
            self._conn.close()
        except OSError:
            pass
