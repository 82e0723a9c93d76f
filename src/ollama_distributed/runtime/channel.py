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
import struct
import time
import uuid
from pathlib import Path
from typing import Any

SHM_DIR = Path("/dev/shm")
_SLOT_HEADER = struct.Struct("<qqq")  # payload bytes in this slot, 1 if more slots follow, sequence number
_SLOT_LEN = struct.Struct("<qq")  # the first two, written before the sequence number that publishes them
_SEQ_AT = 16  # offset of the sequence number in a slot header
_RING_HEADER = struct.Struct("<qq")  # read sequence (the reader's mark), closed flag
_HEADER_BYTES = 64  # the ring header gets its own cache line


class ChannelClosed(RuntimeError):
    """The other side closed the channel."""


def shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class Waiter:
    """Spin, then nap: `pause()` between polls of a condition. spin_s of busy polls (yielding the core to any
    runnable thread), then short naps of `nap_s` for the rest of `short_s` — a step's reply or the next step's
    message usually comes within that, and a nap's overshoot is paid on every step — then naps that double up
    to max_nap_s (an idle shard between requests costs ~1000 polls/s of a few µs each)."""

    def __init__(self, spin_s: float = 2e-4, nap_s: float = 5e-5, short_s: float = 0.05,
                 max_nap_s: float = 1e-3) -> None:
        now = time.perf_counter()
        self.spin_until = now + spin_s
        self.short_until = now + short_s
        self.nap = nap_s
        self.max_nap = max_nap_s

    def pause(self) -> None:
        now = time.perf_counter()
        if now < self.spin_until:
            os.sched_yield()
            return
        time.sleep(self.nap)
        if now >= self.short_until:
            self.nap = min(self.nap * 2, self.max_nap)


class ShmRing:
    """One direction of a shared-memory channel (see module docstring). The creator (the driver) calls
    `ShmRing.create()`, the other process `ShmRing.attach(path)`; either side may write or read, but each ring has
    exactly one writer and one reader."""

    def __init__(self, path: Path, slots: int, slot_bytes: int, fd: int) -> None:
        self.path = Path(path)
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
        return cls(path, slots, slot_bytes, fd)

    @classmethod
    def attach(cls, path: str | Path, slots: int, slot_bytes: int) -> "ShmRing":
        return cls(Path(path), slots, slot_bytes, os.open(path, os.O_RDWR))

    def spec(self) -> dict[str, Any]:
        """What the other process needs to `attach`."""
        return {"kind": "shm", "path": str(self.path), "slots": self.slots, "slot_bytes": self.slot_bytes}

    def unlink(self) -> None:
        """Remove the file (both mappings stay valid); the creator calls this once the peer has attached."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- writer ------------------------------------------------------------------------------------------------
    def send(self, data: bytes, timeout: float | None = None) -> bool:
        """Write one message; False when the reader did not free a slot within `timeout` (None: wait forever)."""
        view = memoryview(data)
        deadline = None if timeout is None else time.monotonic() + timeout
        start = 0
        while True:
            chunk = view[start : start + self.slot_bytes]
            more = start + len(chunk) < len(view)
            seq = self._write_seq + 1
            waiter = Waiter()
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
            start += len(chunk)
            if not more:
                return True

    # -- reader ------------------------------------------------------------------------------------------------
    def poll(self) -> bool:
        """A message (its first slot) is ready to read."""
        return self._slot_seq(self._read_seq + 1) == self._read_seq + 1

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next message, or None when none arrived within `timeout` (None: wait forever; 0: don't wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            seq = self._read_seq + 1
            waiter = Waiter()
            while self._slot_seq(seq) != seq:
                if self._mark()[1]:
                    raise ChannelClosed(f"{self.path.name}: the writer closed the channel")
                # a message's later slots always follow, so only its first slot may give up
                if not parts and deadline is not None and time.monotonic() >= deadline:
                    return None
                waiter.pause()
            at = _HEADER_BYTES + ((seq - 1) % self.slots) * self._stride
            n, more, _ = _SLOT_HEADER.unpack_from(self._buf, at)
            body = at + _SLOT_HEADER.size
            parts.append(bytes(self._buf[body : body + n]))
            self._read_seq = seq
            struct.pack_into("<q", self._buf, 0, seq)  # free the slot for the writer
            if not more:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def _slot_seq(self, seq: int) -> int:
        return struct.unpack_from("<q", self._buf, _HEADER_BYTES + ((seq - 1) % self.slots) * self._stride + _SEQ_AT)[0]

    def _mark(self) -> tuple[int, int]:
        return _RING_HEADER.unpack_from(self._buf, 0)

    def close(self) -> None:
        """Tell the other side (its waits raise ChannelClosed) and drop this mapping."""
        if self._mm.closed:
            return
        try:
            struct.pack_into("<q", self._buf, 8, 1)
        except ValueError:
            pass
        self._buf.release()
        self._mm.close()


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
