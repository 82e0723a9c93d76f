"""runtime/recovery.py pieces that need no cluster: node back-off bookkeeping (literal tables), failure
classification against real live/dead processes and real open/closed ports, and the unplaced stand-in executor
ending an engine's requests with the capacity error. (The full kill → re-plan → replay path runs against real
servers in tests/api/test_fault_tolerance.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.runtime.engine import InferenceEngine
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.recovery import (
    BackoffPolicy,
    CapacityError,
    NodeHealth,
    Recovery,
    UnplacedExecutor,
    classify_failure,
    raylet_reachable,
)
from ollama_distributed.runtime.requests import GenerationRequest

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    "failures_at, now, expected",
    [
        ([0.0], 1.0, False),  # one failure: not backed off
        ([0.0, 10.0], 11.0, False),  # two of three
        ([0.0, 10.0, 20.0], 21.0, True),  # three within the window: backed off
        ([0.0, 10.0, 20.0], 79.0, True),  # still within backoff_s (60) of the last failure
        ([0.0, 10.0, 20.0], 81.0, False),  # healthy for backoff_s: planned on again
        ([0.0, 200.0, 400.0], 401.0, False),  # failures too far apart (window 300 s)
    ],
)
def test_backoff_table(failures_at, now, expected) -> None:
    h = NodeHealth(BackoffPolicy(failures=3, window_s=300, backoff_s=60))
    for t in failures_at:
        h.record_failure("node1", now=t)
    assert ("node1" in h.backed_off(now)) is expected
    assert h.backed_off(now) <= {"node1"}


def test_backoff_policy_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="failures"):
        BackoffPolicy(failures=0)
    with pytest.raises(ValueError, match="backoff_s"):
        BackoffPolicy(backoff_s=-1)


def test_classify_failure_with_real_processes() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a real pid that is now gone
    placement = {"stages": [
        {"shards": [{"node": "node0", "node_id": "A", "pid": os.getpid()}]},
        {"shards": [{"node": "node1", "node_id": "B", "pid": proc.pid}]},
    ]}
    states = {"A": {"name": "node0", "address": "127.0.0.1", "alive": True},
              "B": {"name": "node1", "address": "127.0.0.1", "alive": True}}
    rep = classify_failure(RuntimeError("actor died"), placement, states)
    assert (rep.kind, rep.failed_nodes, rep.lost_nodes) == ("worker_died", ("node1",), ())
    states["B"]["alive"] = False
    rep = classify_failure(RuntimeError("actor died"), placement, states)
    assert (rep.kind, rep.lost_nodes) == ("node_lost", ("node1",))
    rep = classify_failure(RuntimeError("a step did not finish within 5 s"), placement,
                           {**states, "B": {"name": "node1", "address": "10.0.0.9", "alive": True}})
    assert rep.kind == "timeout" and rep.failed_nodes == ()


def test_raylet_probe_real_ports() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert raylet_reachable("127.0.0.1", port)
    assert not raylet_reachable("127.0.0.1", port)  # closed now: refused at once


def test_unplaced_executor_ends_requests_with_the_shortfall(tiny_gguf: Path) -> None:
    tok = Tokenizer.from_gguf(tiny_gguf)
    cfg = LocalExecutor(tiny_gguf).config
    err = CapacityError("the surviving nodes cannot hold the model: needs 41.9 MB, the 1 node hold 35.7 MB",
                        41_900_000, 35_700_000)
    recovery = Recovery(tiny_gguf, cluster=None)  # never asked to re-plan for an unplaced executor
    with InferenceEngine(UnplacedExecutor(cfg, 2048, err), tok, recover=recovery) as eng:
        out = eng.submit(GenerationRequest(prompt_ids=tok.encode("hi"), options=GenerationOptions(num_predict=4)))
        chunks = list(out)
    final = chunks[-1]
    assert final.done and final.error and "cannot hold the model" in final.error and "41.9 MB" in final.error
    assert recovery.records == []
