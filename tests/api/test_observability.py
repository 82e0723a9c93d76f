"""Observability endpoints on the real server application (create_app + observability.install) served by uvicorn
on a free 127.0.0.1 port, driven with real HTTP traffic on the tiny model."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ollama_distributed.api import observability

from .conftest import create_model
from .live_app import serve_app, server_app


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_gguf: Path):
    app = server_app(tmp_path_factory.mktemp("obs-models"), num_parallel=2, max_queue=8)
    srv = serve_app(app)
    try:
        create_model(srv.url, "tiny", tiny_gguf)
        yield srv
    finally:
        srv.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(url + "/metrics", timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):  # raises on anything that is not valid exposition format
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


REQ = "ollama_distributed_requests_total"


def test_metrics_parse_and_request_counters_move_with_traffic(live) -> None:
    before = scrape(live.url)
    opts = {"temperature": 0, "num_predict": 8}
    for _ in range(3):
        r = httpx.post(live.url + "/api/generate", json={"model": "tiny", "prompt": "hello", "stream": False,
                                                         "options": opts}, timeout=120)
        assert r.status_code == 200, r.text
    with httpx.stream("POST", live.url + "/api/chat", json={"model": "tiny", "options": opts,
                                                            "messages": [{"role": "user", "content": "hi"}]},
                      timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and len(lines) >= 2
    assert httpx.post(live.url + "/api/generate", json={"model": "missing-model", "prompt": "x"}).status_code == 404
    assert httpx.get(live.url + "/v1/models/tiny").status_code == 200
    assert httpx.get(live.url + "/no/such/path").status_code == 404
    after = scrape(live.url)
    d = lambda name, **kw: get(after, name, **kw) - get(before, name, **kw)  # noqa: E731
    assert d(REQ, endpoint="/api/generate", model="tiny", status="200") == 3
    assert d(REQ, endpoint="/api/chat", model="tiny", status="200") == 1
    assert d(REQ, endpoint="/api/generate", model="missing-model", status="404") == 1
    # the endpoint label is the route template ("/v1/models/{model...}"), never the raw path
    templ = [dict(k[1])["endpoint"] for k in after if k[0] == REQ and dict(k[1])["endpoint"].startswith("/v1/models/")]
    assert len(templ) == 1 and templ[0].startswith("/v1/models/{"), templ
    assert d(REQ, endpoint=templ[0], model="", status="200") == 1
    assert d(REQ, endpoint="unmatched", model="", status="404") == 1
    assert get(after, REQ, endpoint="/metrics", model="", status="200") >= 1
    # engine and node state are read at scrape time from the real model manager
    assert ("ollama_distributed_queue_depth", (("model", "tiny:latest"),)) in after
    assert any(k[0] == "ollama_distributed_node_up" and v == 1.0 for k, v in after.items())
    # per-strategy families come from the partition manager
    assert ("ollama_distributed_strategy_weight", (("strategy", "pipeline"),)) in after


def test_token_metrics_move_once_handlers_report(live) -> None:
    before = scrape(live.url)
    r = httpx.post(live.url + "/api/generate", json={"model": "tiny", "prompt": "hello", "stream": False,
                                                     "options": {"temperature": 0, "num_predict": 8}}, timeout=120)
    n = r.json()["eval_count"]
    after = scrape(live.url)
    name = "ollama_distributed_tokens_generated_total"
    assert get(after, name, model="tiny:latest") - get(before, name, model="tiny:latest") == n
    ttft = "ollama_distributed_time_to_first_token_seconds_count"
    assert get(after, ttft, model="tiny:latest") - get(before, ttft, model="tiny:latest") == 1


def test_json_endpoints(live) -> None:
    loop = live.app.state.observability
    loop.events.record("node", "node-x joined", node="node-x")
    s = httpx.get(live.url + "/api/distributed/strategies").json()
    assert set(s["strategies"]) == {"single", "pipeline", "tensor", "hybrid"}
    assert abs(sum(v["weight"] for v in s["strategies"].values()) - 1.0) < 1e-9
    assert "calibration" in s and "running" in s and "history" not in s
    h = httpx.get(live.url + "/api/distributed/history", params={"limit": 5}).json()
    assert set(h) == {"selections", "calibration", "autotune"}
    ev = httpx.get(live.url + "/api/distributed/events").json()
    mine = [e for e in ev["events"] if e["kind"] == "node" and e["node"] == "node-x"]
    assert mine and mine[-1]["message"] == "node-x joined"
    last = ev["events"][-1]["id"]
    assert httpx.get(live.url + "/api/distributed/events", params={"since": last}).json()["events"] == []
    assert httpx.get(live.url + "/api/distributed/events", params={"limit": 0}).status_code in (400, 422)
    lv = httpx.get(live.url + "/api/distributed/live").json()
    assert "tokens_per_s" in lv and "tiny:latest" in lv["models"]


def test_dashboard_assets_are_served_and_nothing_else(live) -> None:
    page = httpx.get(live.url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/dashboard/dashboard.js" in page.text
    for name, ctype in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        r = httpx.get(f"{live.url}/dashboard/{name}")
        assert r.status_code == 200 and ctype in r.headers["content-type"]
    for bad in ("dashboard.html.bak", "..%2Fobservability.py", "%2E%2E%2F%2E%2E%2Fapp.py"):
        assert httpx.get(f"{live.url}/dashboard/{bad}").status_code == 404


def test_install_without_server_state_still_serves_metrics() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    loop = observability.install(app)
    with TestClient(app) as c:
        assert c.get("/api/distributed/live").json() == {"models": {}, "tokens_per_s": 0.0}
        text = c.get("/metrics").text
    assert list(text_string_to_metric_families(text))
    assert app.state.observability is loop
