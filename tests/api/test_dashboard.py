"""The dashboard rendered in headless Chromium (Debian's `chromium`, driven by Playwright through executable_path):
a real server with three local Ray nodes runs the tiny model as a pipeline; the page must show every node and the
placement of the model's layers across them. A screenshot is saved under test-artifacts/.

Needs: `apt-get install -y chromium` and `pip install playwright` (no `playwright install`: the Debian browser is
used). Without them the tests skip with the reason.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import httpx
import pytest

from .dashboard_browser import dashboard_page, plan_status_server, require_browser, screenshot
from .live_app import run_with_server, server_app

# 19 MiB per node holds the embedding (or the untied output head) of the tiny model plus one layer with its
# 2048-token KV cache, so the planner must use all three nodes: [0, 1) · [1, 3) · [3, 4).
NODE_MEMORY = "19MiB"

pytestmark = pytest.mark.slow


def _generate(url: str, n_tokens: int = 16) -> dict:
    r = httpx.post(url + "/api/generate", json={"model": "tiny", "prompt": "The quick brown fox", "raw": True,
                                                "stream": False, "options": {"temperature": 0,
                                                                             "num_predict": n_tokens}},
                   timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def test_dashboard_shows_three_node_pipeline(tmp_path_factory, tiny_gguf: Path) -> None:
    require_browser()
    app = server_app(tmp_path_factory.mktemp("dash-models"), local_nodes=3, node_memory=NODE_MEMORY,
                     strategy="pipeline", num_parallel=2, max_queue=8)
    run_with_server(app, lambda url: _check_dashboard(url, app, tiny_gguf), timeout=600)


def _check_dashboard(url: str, app, tiny_gguf: Path) -> None:
    r = httpx.post(url + "/api/create", json={"model": "tiny", "from": str(tiny_gguf), "stream": False},
                   timeout=120)
    assert r.status_code == 200, r.text
    responses = [_generate(url) for _ in range(12)]
    status = httpx.get(url + "/api/distributed/status", timeout=120).json()
    nodes = status["nodes"]
    assert len(nodes) == 3, nodes
    plan = next(m for m in status["models"] if m["name"] == "tiny:latest")["plans"][0]
    assert plan["strategy"] == "pipeline" and len(plan["stages"]) == 3, plan
    assert all(r["eval_count"] > 1 for r in responses)

    # the server attached the running plan at load and reported every request's durations: after N requests on the 3-node cluster the calibrated prediction of the running plan is within 25 % of
    # the measured decode time, and the history shows the prediction moving toward it
    hist = httpx.get(url + "/api/distributed/history").json()["calibration"]
    measured = statistics.median(e["measured_ms"] for e in hist[-5:])
    assert abs(hist[-1]["predicted_after_ms"] - measured) / measured < 0.25, hist[-3:]
    first_err = abs(hist[0]["predicted_before_ms"] - hist[0]["measured_ms"]) / hist[0]["measured_ms"]
    last_err = statistics.median(abs(e["predicted_before_ms"] - e["measured_ms"]) / e["measured_ms"]
                                 for e in hist[-5:])
    assert last_err < 0.25 < first_err, [(e["predicted_before_ms"], e["measured_ms"]) for e in hist]
    # a healthy cluster is not a drifting one: no re-plan proposed
    assert app.state.observability.pending_replan("tiny:latest") is None

    with dashboard_page(url, height=1000) as page:
        page.wait_for_function("Number(document.body.dataset.polls || 0) >= 2", timeout=60_000)
        # every node has a card, named as the cluster names it
        names = sorted(n.get("name") or n["id"] for n in nodes)
        cards = sorted(page.eval_on_selector_all("#nodes .node", "els => els.map(e => e.dataset.node)"))
        assert cards == names
        for n in names:
            assert n in page.inner_text(f'#nodes .node[data-node="{n}"]')
        # the placement table lists each shard with its node and layer range, as the plan says
        rows = page.eval_on_selector_all(".shard-row", "els => els.map(e => [e.dataset.node, e.dataset.layers])")
        want = [[sh["node"], f"{st['layers'][0]}-{st['layers'][1]}"] for st in plan["stages"] for sh in st["shards"]]
        assert rows == want
        text = page.inner_text("#models")
        for st in plan["stages"]:
            assert f"layers [{st['layers'][0]}, {st['layers'][1]})" in text
        assert "tiny:latest" in text and "pipeline · 3 stage(s)" in text
        # the layers × nodes grid: each node's row has exactly its layers filled
        for st in plan["stages"]:
            node = st["shards"][0]["node"]
            filled = page.eval_on_selector_all(f'table.grid tr[data-node="{node}"] td.cell[data-layer]',
                                               "els => els.map(e => Number(e.dataset.layer))")
            assert filled == list(range(*st["layers"])), (node, filled)
        # strategies, calibration and events are shown
        assert page.inner_text('#strategies tr[data-strategy="pipeline"]').split()[0] == "pipeline"
        assert "×" in page.inner_text("#calibration")
        assert "plan" in page.inner_text("#events")
        assert screenshot(page, "dashboard-pipeline-3-nodes.png").stat().st_size > 10_000


def test_dashboard_through_the_cli_server(tmp_path_factory, tiny_gguf: Path) -> None:
    """The same page from `ollama-distributed serve --local-nodes 3 --strategy pipeline`."""
    require_browser()
    from .conftest import start_server, stop_server

    srv = start_server(tmp_path_factory.mktemp("dash-cli"), ["--local-nodes", "3", "--strategy", "pipeline",
                                                              "--node-memory", NODE_MEMORY], timeout=300)
    try:
        r = httpx.post(srv.url + "/api/create", json={"model": "tiny", "from": str(tiny_gguf), "stream": False},
                       timeout=120)
        assert r.status_code == 200, r.text
        _generate(srv.url, 4)
        status = httpx.get(srv.url + "/api/distributed/status", timeout=120).json()
        plan = next(m for m in status["models"] if m["name"] == "tiny:latest")["plans"][0]
        with dashboard_page(srv.url, height=1000) as page:
            cards = page.eval_on_selector_all("#nodes .node", "els => els.map(e => e.dataset.node)")
            assert len(cards) == len(status["nodes"]) == 3
            rows = page.eval_on_selector_all(".shard-row", "els => els.map(e => e.dataset.node)")
            assert rows == [sh["node"] for st in plan["stages"] for sh in st["shards"]]
            screenshot(page, "dashboard-cli-serve.png")
    finally:
        stop_server(srv)


def test_dashboard_draws_tensor_parallel_slices(tmp_path_factory) -> None:
    """A 4-node hybrid plan (2 stages × 2-way tensor parallel) of a 13B model cannot run on this 2-core CI
    machine, so this renders the scheduler's real plan for it: the page is served by observability.install on a
    minimal app whose /api/distributed/status returns that plan in the server's status shape."""
    require_browser()
    from ollama_distributed.scheduler import (ClusterSpec, LinkSpec, NodeSpec, PlanConfig, Workload, plan,
                                              preset_profile)

    gb = 10**9
    spec = ClusterSpec(tuple(NodeSpec(f"gpu{i}", 10 * gb, 900e9, 100e12) for i in range(4)), LinkSpec(5e-6, 50e9))
    hybrid = plan(preset_profile("llama-13b"), spec, Workload(prompt_tokens=256, output_tokens=128),
                  PlanConfig(strategy="hybrid"))
    assert hybrid.strategy == "hybrid" and any(len(st.shards) > 1 for st in hybrid.stages)
    with plan_status_server(spec, "llama-13b", hybrid) as url, dashboard_page(url) as page:
        for st in hybrid.stages:
            total = max(sh.heads[1] for sh in st.shards)
            for sh in st.shards:
                cells = page.eval_on_selector_all(
                    f'table.grid tr[data-node="{sh.node}"] td.cell[data-layer]',
                    "els => els.map(e => [Number(e.dataset.layer), e.firstChild.style.height])")
                share = f"{round(100 * (sh.heads[1] - sh.heads[0]) / total)}%"
                assert cells == [[layer, share] for layer in range(*st.layers)], (sh.node, cells[:3])
        rows = page.eval_on_selector_all(".shard-row", "els => els.map(e => e.innerText)")
        assert len(rows) == sum(len(st.shards) for st in hybrid.stages)
        assert any("heads [0, 20)" in r for r in rows) and any("heads [20, 40)" in r for r in rows)
        assert "hybrid · 2 stage(s)" in page.inner_text("#models")
        screenshot(page, "dashboard-hybrid-plan.png")
