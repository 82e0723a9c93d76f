"""runtime/step_timeout.py: the adaptive step deadline (literal tables), and classify_failure's "hung" kind."""

from __future__ import annotations

import pytest

from ollama_distributed.runtime.executor import ShardLostError
from ollama_distributed.runtime.recovery import classify_failure
from ollama_distributed.runtime.step_timeout import StepTimeout, StepTimer, size_class


@pytest.mark.parametrize("tokens, cls", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (100, 128), (512, 512), (513, 1024)])
def test_size_class(tokens, cls) -> None:
    assert size_class(tokens) == cls


def test_size_class_rejects_empty_steps() -> None:
    with pytest.raises(ValueError, match="at least one token, got 0"):
        size_class(0)


@pytest.mark.parametrize(
    "measured, tokens, deadline",
    [
        ([], 1, 3.0),                          # nothing measured: the floor
        ([], 512, 3.0),
        ([(1, 0.02)], 1, 3.0),                 # 10 × 20 ms decode is below the floor
        ([(1, 0.5)], 1, 5.0),                  # 10 × 500 ms
        ([(1, 0.02)], 512, 102.4),             # prefill never seen: 512 × the decode time × 10 (extrapolated)
        ([(1, 0.02), (512, 0.4)], 512, 4.0),   # prefill measured: its own EMA
        ([(1, 0.02), (512, 0.4)], 300, 4.0),   # 300 tokens share the 512 class
        ([(512, 0.4)], 1, 4.0),                # only larger steps measured: their time bounds a smaller one
        ([(4, 0.08)], 16, 3.2),                # from the nearest smaller class: 0.08 × 16 / 4 × 10
    ],
)
def test_deadline_table(measured, tokens, deadline) -> None:
    timer = StepTimer(StepTimeout(floor_s=3.0, factor=10.0, alpha=1.0))
    for n, s in measured:
        timer.record(n, s)
    assert timer.deadline(tokens) == pytest.approx(deadline)


def test_ema_follows_measurements() -> None:
    timer = StepTimer(StepTimeout(alpha=0.5))
    for s in (1.0, 2.0, 2.0):
        timer.record(1, s)
    assert timer.expected(1) == pytest.approx(1.75)  # 1 → 1.5 → 1.75
    timer.record(1, float("nan"))  # a broken timer reading is ignored
    assert timer.expected(1) == pytest.approx(1.75)
    assert timer.to_dict() == {"1": pytest.approx(1.75)}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"floor_s": 0}, "floor_s"), ({"probe_s": -1}, "probe_s"), ({"factor": 0.5}, "factor"),
     ({"floor_s": 5, "ceiling_s": 1}, "ceiling_s"), ({"alpha": 0}, "alpha")],
)
def test_policy_checks_its_fields(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        StepTimeout(**kwargs)


def test_classify_hung_shard() -> None:
    """A ShardLostError names the hung node: the failure is recorded against it (kind "hung"), even though
    the executor already killed its process (so its pid is gone too)."""
    placement = {"stages": [{"shards": [{"node": "node0", "node_id": "A", "pid": 1}]},
                            {"shards": [{"node": "node1", "node_id": "B", "pid": 2}]}]}
    states = {"A": {"name": "node0", "address": "127.0.0.1", "alive": True},
              "B": {"name": "node1", "address": "127.0.0.1", "alive": True}}
    exc = ShardLostError("lost stage 1 shard 0 on node node1 (pid 2): hung", ("node1",))
    rep = classify_failure(exc, placement, states, pid_alive=lambda pid: pid != 2)
    assert (rep.kind, rep.failed_nodes, rep.lost_nodes) == ("hung", ("node1",), ())
    assert rep.detail == "shard worker hung on node1"
    states["B"]["alive"] = False  # the whole node went away meanwhile: that is what counts
    rep = classify_failure(exc, placement, states)
    assert (rep.kind, rep.lost_nodes) == ("node_lost", ("node1",))
