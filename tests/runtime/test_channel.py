"""Step channels (runtime/channel.py) between real (forked) processes: messages arrive whole and in order, messages larger
than a slot and more messages than slots pass, a closed side is noticed, a wait with a time-out gives up."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest

from ollama_distributed.runtime.channel import ChannelClosed, ShmRing, SocketChannel, shm_available

pytestmark = pytest.mark.skipif(not shm_available(), reason="no writable /dev/shm")


def _echo_shm(req: dict, rep: dict) -> None:
    a = ShmRing.attach(req["path"], req["slots"], req["slot_bytes"])
    b = ShmRing.attach(rep["path"], rep["slots"], rep["slot_bytes"])
    try:
        while True:
            msg = a.recv()
            if msg == b"stop":
                return
            b.send(msg[::-1])
    except ChannelClosed:
        return


def _echo_tcp(address: tuple, key: bytes) -> None:
    ch = SocketChannel.connect(address, key)
    try:
        while True:
            msg = ch.recv()
            if msg == b"stop":
                return
            ch.send(msg[::-1])
    except ChannelClosed:
        return


def test_shm_ring_between_processes():
    req, rep = ShmRing.create(slots=4, slot_bytes=1024), ShmRing.create(slots=4, slot_bytes=1024)
    proc = mp.get_context("fork").Process(target=_echo_shm, args=(req.spec(), rep.spec()))
    proc.start()
    try:
        assert rep.recv(timeout=0.05) is None  # nothing sent yet: the wait gives up
        messages = [os.urandom(n) for n in (0, 1, 1023, 1024, 1025, 10_000, 5)]  # up to ~10 slots each
        for m in messages:
            assert req.send(m, timeout=60)
            assert rep.recv(timeout=60) == m[::-1]
        # more messages in flight than slots (replies drained by a thread): each writer waits for its reader
        got: list = []
        drain = threading.Thread(target=lambda: got.extend(rep.recv(timeout=60) for _ in messages * 3))
        drain.start()
        for m in messages * 3:
            assert req.send(m, timeout=60)
        drain.join(120)
        assert got == [m[::-1] for m in messages * 3]
        assert req.send(b"stop", timeout=60)
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        for r in (req, rep):
            r.close()
            r.unlink()
        if proc.is_alive():
            proc.kill()


def test_shm_ring_close_is_seen_by_a_waiting_reader():
    ring = ShmRing.create(slots=2, slot_bytes=64)
    peer = ShmRing.attach(ring.path, 2, 64)
    ring.unlink()
    ring.close()
    with pytest.raises(ChannelClosed):
        peer.recv(timeout=5)
    peer.close()


def test_socket_channel_between_processes():
    key = os.urandom(16)
    listener = SocketChannel.listen("127.0.0.1", key)
    proc = mp.get_context("fork").Process(target=_echo_tcp, args=(listener.address, key))
    proc.start()
    ch = SocketChannel(listener.accept())
    listener.close()
    try:
        assert ch.recv(timeout=0.05) is None
        big = os.urandom(300_000)
        ch.send(big)
        assert ch.recv(timeout=60) == big[::-1]
        ch.send(b"stop")
        proc.join(30)
        assert proc.exitcode == 0
        with pytest.raises(ChannelClosed):  # the peer is gone
            ch.recv(timeout=5)
    finally:
        ch.close()
        if proc.is_alive():
            proc.kill()


def test_a_waiting_reader_sleeps():
    """A reader with nothing to read sleeps on the ring's doorbell instead of polling: waiting 0.5 s costs
    (almost) no CPU, while a message still wakes it at once."""
    ring = ShmRing.create(slots=4, slot_bytes=1024)
    try:
        cpu0 = time.process_time()
        assert ring.recv(timeout=0.5) is None
        assert time.process_time() - cpu0 < 0.05
        threading.Timer(0.2, lambda: ring.send(b"late")).start()
        t0 = time.perf_counter()
        assert ring.recv(timeout=10) == b"late"
        assert time.perf_counter() - t0 < 0.3
    finally:
        ring.unlink()
        ring.close()
