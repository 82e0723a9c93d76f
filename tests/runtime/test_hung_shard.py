"""A shard that hangs without dying (its process SIGSTOPped) is found by the adaptive step time-out within
floor + probe seconds, killed, and reported as ShardLostError naming its node; the surviving shard is taken over
by the replacement executor (not restarted), which computes exactly what the failed one did.

Real processes on the session's 4-raylet local Ray cluster; the reference is the in-process LocalExecutor.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.executor import ShardLostError
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.placement import uniform_plan
from ollama_distributed.runtime.ray_executor import RayExecutor
from ollama_distributed.runtime.step_timeout import StepTimeout
from tests.helpers.processes import release

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = [1, 17, 42, 99, 7]
POLICY = StepTimeout(floor_s=1.0, probe_s=1.0)


def greedy(ex, seq_id: int, n: int) -> tuple[list[int], torch.Tensor]:
    logits = ex.step([seq_id], [PROMPT])
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits = ex.step([seq_id], [[out[-1]]])
    return out, logits[0]


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_hung_stage_is_detected_killed_and_its_peer_reused(tiny_gguf, ray_cluster) -> None:
    cfg = read_config(tiny_gguf)
    local = LocalExecutor(tiny_gguf, max_seq_len=256)
    want, want_logits = greedy(local, 1, 8)
    local.close()
    plan = uniform_plan(cfg, [["node1"], ["node2"]], "tiny")
    ex = RayExecutor(plan, tiny_gguf, ray_cluster, max_seq_len=256, step_timeout=POLICY)
    new = None
    shards = [sh for st in ex.placement()["stages"] for sh in st["shards"]]
    victim, peer = shards[1], shards[0]
    try:
        got, _ = greedy(ex, 1, 4)
        assert got == want[:4]
        assert ex.timer.expected(1) is not None and ex.timer.deadline(1) == POLICY.floor_s  # decode is fast
        os.kill(victim["pid"], signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(ShardLostError) as info:
            ex.step([1], [[want[4]]])
        detect_s = time.perf_counter() - t0
        print(f"\nhung stage detected in {detect_s:.2f} s: {info.value}")
        assert info.value.nodes == ("node2",)
        assert f"on node node2 (pid {victim['pid']})" in str(info.value) and "hung" in str(info.value)
        # floor + probe, plus slack for a loaded 2-core machine; the fixed time-out it replaces was 300 s
        assert POLICY.floor_s + POLICY.probe_s - 0.1 <= detect_s < POLICY.floor_s + POLICY.probe_s + 5.0
        assert gone(victim["pid"]), "the hung worker was not killed"
        with pytest.raises(Exception, match="broken"):
            ex.step([1], [[want[4]]])
        live = ex.detach_survivors()
        assert [(s.node_id, s.pid) for s in live] == [(peer["node_id"], peer["pid"])]
        ex.close()
        assert psutil.pid_exists(peer["pid"]), "close() killed a detached shard"
        new = RayExecutor(plan, tiny_gguf, ray_cluster, max_seq_len=256, step_timeout=POLICY, reuse=live)
        assert new.reused_shards == 1
        placed = [sh for st in new.placement()["stages"] for sh in st["shards"]]
        assert placed[0]["pid"] == peer["pid"] and placed[1]["pid"] != victim["pid"]
        assert new.cached_sequences() == set()  # the reused shard forgot the failed executor's sequences
        # the engine's replay: the whole history from position 0
        got, logits = greedy(new, 1, 8)
        assert got == want
        err = (logits - want_logits).abs().max().item() / max(1.0, want_logits.abs().max().item())
        assert err <= 1e-5, err
    finally:
        release(victim["pid"])
        ex.close()
        if new is not None:
            new.close()


def test_slow_but_alive_step_is_not_killed(tiny_gguf, ray_cluster) -> None:
    """A long prefill past the deadline: the busy shards answer their probes, so the step completes."""
    cfg = read_config(tiny_gguf)
    # a floor far below a 2048-token prefill on 2 cores: the deadline passes during the step
    policy = StepTimeout(floor_s=0.05, factor=1.0, probe_s=1.0)
    ex = RayExecutor(uniform_plan(cfg, [["node1"], ["node2"]], "tiny"), tiny_gguf, ray_cluster, max_seq_len=4096,
                     step_timeout=policy)
    try:
        t0 = time.perf_counter()
        logits = ex.step([2], [list(range(1, 2049))])  # nothing measured yet: the deadline is the floor
        took = time.perf_counter() - t0
        assert logits.shape == (1, cfg.vocab_size)
        print(f"\n2048-token prefill took {took:.2f} s, probed {ex.probe_rounds}× past its deadline: not killed")
        assert took > policy.floor_s and ex.probe_rounds >= 1  # the deadline really passed during the step
        ex.step([2], [[7]])  # and the executor is fine afterwards
    finally:
        ex.close()
