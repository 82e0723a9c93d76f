"""Shared-memory hops and sums between co-located shards (runtime/shm_comm.py), between real processes: the sum
equals the rank-order sum and is bit-identical on every rank (tensors larger than a slot included, many calls in a
row), a hop carries a tensor whole, and a SIGKILLed peer makes the waiting ranks fail fast instead of spinning."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from ollama_distributed.runtime.channel import shm_available
from ollama_distributed.runtime.shm_comm import (PeerGone, ShmAllReduce, colocated, create_hop, liveness_check,
                                                 pid_alive, recv_tensor, send_tensor)

pytestmark = pytest.mark.skipif(not shm_available(), reason="no writable /dev/shm")
CTX = mp.get_context("spawn")  # torch and fork don't mix (OpenMP's thread pool)


def _inputs(rank: int, calls: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(numel + 37 * c, generator=g).to(dtype) for c in range(calls)]


def _reduce_rank(spec: dict, rank: int, pids: dict, calls: int, numel: int, dtype: torch.dtype, q) -> None:
    seg = ShmAllReduce.attach(spec, rank, liveness_check({r: p for r, p in pids.items() if r != rank}))
    try:
        # as float32 numpy arrays: a torch tensor in a Queue is shared by a handle that dies with this process
        q.put((rank, [seg.all_reduce(t.clone()).float().numpy() for t in _inputs(rank, calls, numel, dtype)]))
    except PeerGone as exc:
        q.put((rank, str(exc)))


@pytest.mark.parametrize("ranks,dtype", [(2, torch.float32), (3, torch.float32), (2, torch.bfloat16)])
def test_all_reduce_equals_rank_order_sum_on_every_rank(ranks, dtype):
    seg = ShmAllReduce.create(ranks, slot_bytes=4096)  # 1024 floats a slot: most calls take several pieces
    q = CTX.Queue()
    calls, numel = 12, 2500
    procs = [CTX.Process(target=_reduce_rank, args=(seg.spec(), r, {}, calls, numel, dtype, q)) for r in range(ranks)]
    for p in procs:
        p.start()
    try:
        got = dict(q.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
        seg.unlink()
        seg.detach()
    inputs = [_inputs(r, calls, numel, dtype) for r in range(ranks)]
    for c in range(calls):
        want = inputs[0][c] + inputs[1][c]
        for r in range(2, ranks):
            want = want + inputs[r][c]
        for r in range(ranks):
            assert torch.equal(torch.from_numpy(got[r][c]).to(dtype), want), (r, c)


def test_a_killed_peer_fails_the_wait_fast():
    seg = ShmAllReduce.create(2)
    q = CTX.Queue()
    victim = CTX.Process(target=time.sleep, args=(600,))  # a rank that never arrives, then dies
    victim.start()
    waiter = CTX.Process(target=_reduce_rank, args=(seg.spec(), 0, {1: victim.pid}, 1, 8, torch.float32, q))
    waiter.start()
    try:
        time.sleep(1.0)
        assert q.empty()  # rank 0 waits for rank 1
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        rank, msg = q.get(timeout=30)
        assert rank == 0 and f"pid {victim.pid}" in msg, msg
        assert time.monotonic() - t0 < 5
    finally:
        victim.join(10)
        waiter.join(30)
        seg.unlink()
        seg.detach()


def _hop_sender(spec: dict, shapes: list, dtype: torch.dtype) -> None:
    from ollama_distributed.runtime.channel import ShmRing

    ring = ShmRing.attach(spec["path"], spec["slots"], spec["slot_bytes"])
    for i, shape in enumerate(shapes):
        send_tensor(ring, torch.arange(torch.Size(shape).numel(), dtype=torch.float32).to(dtype).view(shape) + i,
                    lambda: None)
    time.sleep(600)  # stays until killed


def test_hop_carries_tensors_whole_and_notices_a_dead_sender():
    ring = create_hop()
    shapes = [(1, 576), (3, 576), (700, 576), (2, 8)]  # one decode token ... a prefill over several slots
    proc = CTX.Process(target=_hop_sender, args=(ring.spec(), shapes, torch.bfloat16))
    proc.start()
    try:
        check = liveness_check({1: proc.pid})
        for i, shape in enumerate(shapes):
            got = recv_tensor(ring, shape, torch.bfloat16, check)
            want = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).to(torch.bfloat16).view(shape) + i
            assert torch.equal(got, want)
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(PeerGone, match=f"pid {proc.pid}"):
            recv_tensor(ring, (1, 576), torch.bfloat16, check)
    finally:
        proc.join(10)
        ring.unlink()
        ring.close()


def test_pid_alive():
    assert pid_alive(os.getpid())
    p = CTX.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    assert not pid_alive(p.pid)


@pytest.mark.parametrize("stage_ranks,send_to,hosts,edges,stages,feeds", [
    # 2 stages on one host: the hop, the feed back from the last stage to the first, no sums
    (((0,), (1,)), {0: (1,), 1: ()}, ["a", "a"], [(0, 1)], [], [(1, 0)]),
    # 2 stages on two hosts: nothing
    (((0,), (1,)), {0: (1,), 1: ()}, ["a", "b"], [], [], []),
    # 2-way TP on one host: its sum; the output rank 0 feeds rank 1
    (((0, 1),), {0: (), 1: ()}, ["a", "a"], [], [0], [(0, 1)]),
    # 2-way TP over two hosts feeding a stage on the first: one hop of two, no sum, the feed to rank 0 only
    (((0, 1), (2,)), {0: (2,), 1: ()}, ["a", "b", "a"], [(0, 2)], [], [(2, 0)]),
    # PP x TP, each stage on its own host: sums inside, hops and feeds across stay on gloo
    (((0, 1), (2, 3)), {0: (2,), 1: (3,), 2: (), 3: ()}, ["a", "a", "b", "b"], [], [0, 1], []),
    # one shard: nothing to feed
    (((0,),), {0: ()}, ["a"], [], [], []),
])
def test_colocated(stage_ranks, send_to, hosts, edges, stages, feeds):
    assert colocated(stage_ranks, send_to, hosts) == (edges, stages, feeds)
