"""The driver's side of the shards' resident step loops (worker.py `serve`): a step channel per shard
(runtime/channel.py), one message out and one reply back per shard per step, and the watch on the loops.

A shard on this machine gets a pair of shared-memory rings; a shard elsewhere a TCP connection. While waiting for
replies the driver polls the channels (spin, then short naps) and, every `check_s`, asks Ray whether a loop's call
has ended — which it only does when its actor died (or it was told to stop): that is how a killed shard surfaces
within a step. A shard that hangs without dying is left to the caller's deadline (`on_deadline`: the executor's
liveness probe, runtime/step_timeout.py).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
from typing import Any, Callable, Sequence

from .channel import ChannelClosed, ShmRing, SocketChannel, Waiter, shm_available

log = logging.getLogger(__name__)

LOOP_GROUP = "loop"  # the actors' concurrency group for `serve`, so `ping` and `info` still answer beside it


class LoopEnded(RuntimeError):
    """A shard's step loop ended during a step: its actor died (`cause` is Ray's error) or it stopped."""

    def __init__(self, index: int, cause: BaseException | None) -> None:
        super().__init__(f"shard {index}'s step loop ended: {cause}")
        self.index = index
        self.cause = cause


class StepTimeoutError(RuntimeError):
    """No reply within the ceiling."""


class StepLoops:
    """Open a channel to each of `workers` (Ray actor handles; `infos` their `info()` dicts, with "ip" and
    "host": a worker with this driver's node address and host name gets shared memory) and start their loops.
    check_s: how often a wait for replies asks Ray whether a loop ended."""

    def __init__(self, workers: Sequence[Any], infos: Sequence[dict[str, Any]], timeout_s: float,
                 check_s: float = 0.02) -> None:
        import ray

        self.check_s = check_s
        self._req: list[Any] = []
        self._rep: list[Any] = []
        self.kinds: list[str] = []
        self.loops: list[Any] = []
        here_ip, here_host = ray.util.get_node_ip_address(), socket.gethostname()
        shm = shm_available()
        pending_tcp: list[tuple[int, Any, bytes]] = []
        rings: list[ShmRing] = []
        try:
            opened = []
            for i, (w, info) in enumerate(zip(workers, infos)):
                if shm and info.get("ip") == here_ip and info.get("host") == here_host:
                    req, rep = ShmRing.create(), ShmRing.create()
                    rings += [req, rep]
                    self._req.append(req)
                    self._rep.append(rep)
                    self.kinds.append("shm")
                    opened.append(w.open_channel.remote({"kind": "shm", "req": req.spec(), "rep": rep.spec()}))
                else:
                    key = os.urandom(16)
                    self._req.append(None)
                    self._rep.append(None)
                    self.kinds.append("tcp")
                    pending_tcp.append((i, key, None))
                    opened.append(w.open_channel.remote({"kind": "tcp", "authkey": key}))
            addresses = ray.get(opened, timeout=timeout_s)
            for ring in rings:
                ring.unlink()  # both sides hold their mappings; nothing is left in /dev/shm if either dies
            self.loops = [w.serve.options(concurrency_group=LOOP_GROUP).remote() for w in workers]
            for i, key, _ in pending_tcp:
                chan = SocketChannel.connect(tuple(addresses[i]), key)
                self._req[i] = self._rep[i] = chan
        except BaseException:
            for ring in rings:
                ring.unlink()
            self.close()
            raise
        log.info("step loops: %s", self.kinds)

    def send(self, data: bytes, to: Sequence[int] | None = None) -> None:
        for i in range(len(self._req)) if to is None else to:
            self._req[i].send(data)

    def collect(self, on_deadline: Callable[[list[int], float], None], interval_s: float, ceiling_s: float,
                of: Sequence[int] | None = None) -> list[Any]:
        """The next reply of each shard (`of`: these only), unpickled, in shard order. At every `interval_s` of
        waiting, `on_deadline(busy shards, waited s)` (it raises to give up); past `ceiling_s`: StepTimeoutError;
        a loop that ended: LoopEnded; a closed TCP channel: ChannelClosed."""
        which = list(range(len(self._rep))) if of is None else list(of)
        out: dict[int, Any] = {}
        t0 = time.monotonic()
        next_check, deadline, ceiling = t0 + self.check_s, t0 + interval_s, t0 + ceiling_s
        # sleep on the shared-memory replies' doorbells and the TCP channels' sockets: woken by any reply
        waiter = Waiter(bells=[self._rep[i].bell for i in which if isinstance(self._rep[i], ShmRing)],
                        sockets=[self._rep[i].fileno() for i in which if not isinstance(self._rep[i], ShmRing)])
        while True:
            for i in which:
                if i not in out and self._rep[i].poll():
                    out[i] = pickle.loads(self._rep[i].recv())
            if len(out) == len(which):
                return [out[i] for i in which]
            now = time.monotonic()
            if now >= next_check:
                self._check_loops([i for i in which if i not in out])
                next_check = time.monotonic() + self.check_s
            if now >= ceiling:
                raise StepTimeoutError(f"no reply within {ceiling_s:.0f} s")
            if now >= deadline:
                on_deadline([i for i in which if i not in out], now - t0)
                deadline = time.monotonic() + interval_s
            waiter.pause()

    def _check_loops(self, busy: list[int]) -> None:
        import ray

        refs = [self.loops[i] for i in busy]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            i = busy[refs.index(ref)]
            try:
                ray.get(ref)
                cause: BaseException | None = None
            except Exception as exc:  # noqa: BLE001 - the actor died: the caller names the shard
                cause = exc
            raise LoopEnded(i, cause)

    def stop(self, indices: Sequence[int], grace_s: float) -> set[int]:
        """Ask these loops to stop (a loop busy in a step for a lost peer never reads it); the shards whose loop
        ended cleanly within `grace_s`."""
        import ray

        stop = pickle.dumps(("stop",))
        asked = []
        for i in indices:
            try:
                if self._req[i] is not None and self._req[i].send(stop, timeout=0):
                    asked.append(i)
            except ChannelClosed:
                pass
        if not asked:
            return set()
        refs = [self.loops[i] for i in asked]
        ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        ok = set()
        for i, ref in zip(asked, refs):
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            try:
                ray.get(done[0])
                ok.add(i)
            except Exception:  # noqa: BLE001 - died meanwhile
                pass
        return ok

    def close(self) -> None:
        seen = set()
        for ch in self._req + self._rep:
            if ch is not None and id(ch) not in seen:
                seen.add(id(ch))
                ch.close()
