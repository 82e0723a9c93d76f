"""ServerMetrics, the strategy collector and the event log: real prometheus_client registries parsed with its
own parser, a real PartitionManager, real threads."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ollama_distributed.scheduler.manager import PartitionManager
from ollama_distributed.service.events import EventLog
from ollama_distributed.service.metrics import OTHER, ServerMetrics, StrategyCollector


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_histograms_move_and_parse() -> None:
    m = ServerMetrics()
    m.observe_request("/api/generate", "tiny:latest", 200)
    m.observe_request("/api/generate", "tiny:latest", 200)
    m.observe_request("/api/chat", "nope", 404)
    m.observe_ttft("tiny:latest", 0.03)
    m.observe_token("tiny:latest", None, 1)
    for _ in range(4):
        m.observe_token("tiny:latest", 0.012)
    m.set_engines([("tiny:latest", {"waiting": 3, "running": 2})])
    m.set_nodes([{"id": "n1", "name": "node-1", "state": "alive",
                  "measured": {"memory_bandwidth": 2e10, "flops": 5e10}},
                 {"id": "n2", "state": "dead", "measured": {}}], {"node-1": 1.5})
    p = "ollama_distributed"
    assert value(m, f"{p}_requests_total", endpoint="/api/generate", model="tiny:latest", status="200") == 2
    assert value(m, f"{p}_requests_total", endpoint="/api/chat", model="nope", status="404") == 1
    assert value(m, f"{p}_tokens_generated_total", model="tiny:latest") == 5
    assert value(m, f"{p}_time_to_first_token_seconds_count", model="tiny:latest") == 1
    assert value(m, f"{p}_time_to_first_token_seconds_bucket", model="tiny:latest", le="0.04") == 1
    assert value(m, f"{p}_time_to_first_token_seconds_bucket", model="tiny:latest", le="0.02") == 0
    assert value(m, f"{p}_inter_token_latency_seconds_count", model="tiny:latest") == 4
    assert value(m, f"{p}_queue_depth", model="tiny:latest") == 3
    assert value(m, f"{p}_running_sequences", model="tiny:latest") == 2
    assert value(m, f"{p}_node_up", node="node-1") == 1 and value(m, f"{p}_node_up", node="n2") == 0
    assert ((f"{p}_node_up", (("node", "n2"),)) in samples(m))
    assert value(m, f"{p}_node_flops", node="node-1") == 5e10
    assert value(m, f"{p}_node_calibration_factor", node="node-1") == 1.5
    # a model that is no longer loaded disappears from the engine gauges
    m.set_engines([])
    assert (f"{p}_queue_depth", (("model", "tiny:latest"),)) not in samples(m)
    assert m.tokens_per_s()["tiny:latest"] == pytest.approx(5 / m.rate_window_s)


def test_registries_are_private_and_model_labels_are_capped() -> None:
    a, b = ServerMetrics(max_models=2), ServerMetrics()
    for name in ("m1", "m2", "m3", "m4"):
        a.observe_request("/api/generate", name, 404)
    b.observe_request("/api/tags", None, 200)
    sa = samples(a)
    models = {dict(k[1]).get("model") for k in sa if k[0] == "ollama_distributed_requests_total"}
    assert models == {"m1", "m2", OTHER}
    assert value(a, "ollama_distributed_requests_total", endpoint="/api/generate", model=OTHER, status="404") == 2
    assert value(b, "ollama_distributed_requests_total", endpoint="/api/tags", model="", status="200") == 1
    assert not any(k[0] == "ollama_distributed_requests_total" and dict(k[1]).get("endpoint") == "/api/tags"
                   for k in sa)


def test_strategy_collector_reads_the_partition_manager() -> None:
    m = ServerMetrics()
    mgr = PartitionManager()
    m.registry.register(StrategyCollector(mgr))
    p = "ollama_distributed_strategy"
    assert value(m, f"{p}_executions_total", strategy="pipeline") == 0
    for i in range(3):
        mgr.record("pipeline", "m", "p1-o1-c1", True, float(i), measured_ms=10.0 + i, tokens_per_s=100.0,
                   predicted_ms=5.0)
    mgr.record("pipeline", "m", "p1-o1-c1", False, 4.0)
    mgr.record("tensor", "m", "p1-o1-c1", True, 5.0, measured_ms=4.0, predicted_ms=4.0)
    assert value(m, f"{p}_executions_total", strategy="pipeline") == 4
    assert value(m, f"{p}_successes_total", strategy="pipeline") == 3
    assert value(m, f"{p}_failures_total", strategy="pipeline") == 1
    assert value(m, f"{p}_success_rate", strategy="pipeline") == pytest.approx(0.75)
    ema = 0.2 * 12 + 0.8 * (0.2 * 11 + 0.8 * 10)
    assert value(m, f"{p}_ema_latency_ms", strategy="pipeline") == pytest.approx(ema)
    weights = {s: value(m, f"{p}_weight", strategy=s) for s in ("single", "pipeline", "tensor", "hybrid")}
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["tensor"] > weights["pipeline"]  # measured as predicted and never failed
    assert value(m, f"{p}_enabled", strategy="hybrid") == 1


def test_event_log_is_bounded_structured_and_thread_safe(caplog: pytest.LogCaptureFixture) -> None:
    log = EventLog(capacity=50)
    with caplog.at_level(logging.INFO, logger="ollama_distributed.events"):
        ev = log.record("plan", "m: pipeline plan abc — because", model="m", plan_id="abc", predicted={"x": 1.0})
    rec = [r for r in caplog.records if r.name == "ollama_distributed.events"][-1]
    assert rec.event["kind"] == "plan" and rec.event["data"]["plan_id"] == "abc"
    assert json.loads(rec.getMessage())["message"] == "m: pipeline plan abc — because"
    assert ev.id == 1

    def writer(k: int) -> None:
        for i in range(200):
            log.record("failure" if i % 2 else "recovery", f"w{k} {i}", level="warning", model=f"m{k}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log) == 50
    recent = log.recent(limit=1000)
    assert len(recent) == 50 and [e.id for e in recent] == sorted(e.id for e in recent)
    assert recent[-1].id == 1 + 8 * 200
    assert log.counts() == {"plan": 1, "failure": 800, "recovery": 800}
    assert all(e.kind == "failure" for e in log.recent(kind="failure"))
    assert [e.id for e in log.recent(since_id=recent[-3].id)] == [recent[-2].id, recent[-1].id]
    with pytest.raises(ValueError, match="event kind"):
        log.record("Bad Kind", "x")
    with pytest.raises(ValueError, match="level"):
        log.record("plan", "x", level="loud")
