"""Adaptive selection learns the truly best strategy; the manager's statistics and history behave."""

import math
import random
import threading

import pytest

from ollama_distributed.scheduler import (AdaptiveConfig, ManagerConfig, PartitionManager, SchedulerError, Workload)
from ollama_distributed.scheduler.profile import preset_profile
from ollama_distributed.scheduler.strategies.adaptive import AdaptiveStrategy, ArmEvidence

from .helpers import GB, cluster, node

PROFILE = preset_profile("llama3-8b")
# every strategy is feasible here: 4 nodes, the fastest holds the whole model
CLUSTER = cluster(node("a", 24 * GB, bw=300e9, flops=50e12), node("b", 24 * GB, bw=200e9, flops=50e12),
                  node("c", 12 * GB, bw=400e9, flops=50e12), node("d", 12 * GB, bw=400e9, flops=50e12),
                  latency=5e-5, bandwidth=1.25e9)
WORKLOAD = Workload(prompt_tokens=128, output_tokens=128)


def _hidden_factors(rng: random.Random, names: list[str], predicted: dict[str, float]) -> dict[str, float]:
    """True cost = predicted × factor; the best true cost beats the second by ≥ 20% (learnable with 10% noise)."""
    while True:
        f = {n: math.exp(rng.uniform(-0.7, 0.7)) for n in names}
        true = sorted(predicted[n] * f[n] for n in names)
        if true[1] >= 1.2 * true[0]:
            return f


def _simulate(seed: int, exploration: str, requests: int = 20) -> tuple[bool, bool]:
    """(chose the truly best at the last request, the truly best differs from the predicted best)."""
    rng = random.Random(seed)
    mgr = PartitionManager(ManagerConfig(history_size=8, adaptive=AdaptiveConfig(exploration=exploration, seed=seed)))
    first = mgr.select(PROFILE, CLUSTER, WORKLOAD, now=0.0)
    predicted = {n: ms for n, ms in mgr.history()[0]["candidates_ms"].items()}
    factors = _hidden_factors(rng, sorted(predicted), predicted)
    true = {n: predicted[n] * factors[n] for n in predicted}
    best = min(true, key=true.get)
    sel = first
    for r in range(requests):
        if r:
            sel = mgr.select(PROFILE, CLUSTER, WORKLOAD, now=float(r))
        measured = true[sel.strategy] * math.exp(rng.gauss(0.0, 0.1))
        mgr.record_outcome(sel.decision_id, True, now=float(r) + 0.5, measured_ms=measured)
    assert len(mgr.history()) == 8  # bounded
    return sel.strategy == best, best != min(predicted, key=predicted.get)


@pytest.mark.parametrize("exploration", ["thompson", "ucb"])
def test_adaptive_converges_to_truly_best_within_20_requests(exploration):
    results = [_simulate(seed, exploration) for seed in range(100)]
    converged = sum(ok for ok, _ in results)
    surprising = sum(s for _, s in results)
    assert surprising >= 30, "the hidden costs must often disagree with the prediction"
    assert converged >= 95, f"{exploration}: converged in {converged}/100 runs"


def test_posterior_and_reason():
    ad = AdaptiveStrategy(AdaptiveConfig(exploration="greedy"))
    d = ad.choose({"pipeline": 0.010, "tensor": 0.012}, {})
    assert d.choice == "pipeline" and "chose pipeline" in d.reason and "tensor" in d.reason
    # tensor measured at half its prediction, many times: the greedy choice flips
    ev = {"tensor": ArmEvidence(10, 10 * math.log(0.5))}
    d = ad.choose({"pipeline": 0.010, "tensor": 0.012}, ev)
    assert d.choice == "tensor" and d.corrected["tensor"] < 0.0065
    with pytest.raises(ValueError, match="no candidate"):
        ad.choose({}, {})
    with pytest.raises(ValueError, match="exploration"):
        AdaptiveConfig(exploration="coin-flip")


def test_history_is_bounded_and_keeps_inputs_choice_prediction_measurement():
    mgr = PartitionManager(ManagerConfig(history_size=5))
    ids = []
    for r in range(12):
        s = mgr.select(PROFILE, CLUSTER, WORKLOAD, now=float(r))
        ids.append(s.decision_id)
        mgr.record_outcome(s.decision_id, True, now=r + 0.1, measured_ms=s.predicted_ms * 1.1)
        assert len(mgr.history()) <= 5
    hist = mgr.history()
    assert [h["id"] for h in hist] == ids[-5:]  # oldest dropped
    h = hist[-1]
    assert h["model"] == "llama3-8b" and h["workload"]["prompt_tokens"] == 128 and h["choice"] in h["candidates_ms"]
    assert h["measured_ms"] == pytest.approx(h["predicted_ms"] * 1.1) and h["reason"]
    with pytest.raises(SchedulerError, match="unknown or already reported"):
        mgr.record_outcome(ids[-1], True, now=99.0)


def test_stats_ema_success_rate_and_weights():
    mgr = PartitionManager(ManagerConfig(ema_alpha=0.5))
    mgr.record("pipeline", "m", "c", True, now=1.0, measured_ms=100.0, tokens_per_s=10.0, predicted_ms=100.0)
    mgr.record("pipeline", "m", "c", True, now=2.0, measured_ms=200.0, tokens_per_s=20.0, predicted_ms=100.0)
    mgr.record("pipeline", "m", "c", False, now=3.0)
    st = mgr.stats("pipeline")
    assert st["executions"] == 3 and st["successes"] == 2 and st["failures"] == 1
    assert st["success_rate"] == pytest.approx(2 / 3)
    assert st["ema_latency_ms"] == pytest.approx(150.0) and st["ema_tokens_per_s"] == pytest.approx(15.0)
    assert st["last_updated"] == 3.0
    assert mgr.stats("pipeline", "m", "c")["executions"] == 3
    assert mgr.stats("pipeline", "other", "c")["executions"] == 0
    w = mgr.weights()
    assert sum(w.values()) == pytest.approx(1.0) and w["pipeline"] < w["tensor"]
    import json
    json.dumps(mgr.to_dict())  # JSON-ready


def test_disabled_strategies_are_not_chosen():
    mgr = PartitionManager(ManagerConfig(enabled=("pipeline",)))
    assert mgr.enabled() == ["pipeline"]
    for r in range(5):
        assert mgr.select(PROFILE, CLUSTER, WORKLOAD, now=float(r)).strategy == "pipeline"
    mgr.set_enabled("pipeline", False)
    with pytest.raises(SchedulerError, match="every strategy is disabled"):
        mgr.select(PROFILE, CLUSTER, WORKLOAD, now=9.0)
    with pytest.raises(SchedulerError, match="unknown strategy"):
        mgr.set_enabled("quantum", True)


def test_concurrent_recording_adds_up():
    mgr = PartitionManager(ManagerConfig(history_size=50))
    errors = []

    def worker(t: int) -> None:
        try:
            for i in range(300):
                mgr.record(["pipeline", "tensor"][i % 2], "m", "c", i % 3 != 0, now=float(i),
                           measured_ms=10.0 + t, predicted_ms=10.0)
            for i in range(5):
                s = mgr.select(PROFILE, CLUSTER, WORKLOAD, now=float(i))
                mgr.record_outcome(s.decision_id, True, now=float(i), measured_ms=s.predicted_ms)
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    d = mgr.to_dict()
    total = sum(s["stats"]["executions"] for s in d["strategies"].values())
    assert total == 8 * 300 + 8 * 5
    assert d["strategies"]["pipeline"]["stats"]["executions"] >= 8 * 150
    assert sum(s["stats"]["failures"] for s in d["strategies"].values()) == 8 * 100
    assert len(d["history"]) == 40
