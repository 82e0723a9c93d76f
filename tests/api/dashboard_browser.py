"""What the dashboard tests share: Debian's Chromium driven by Playwright (no `playwright install`), the page
opened once the placement table is drawn, screenshots under test-artifacts/, and a minimal app that serves the
dashboard over a fixed status holding the scheduler's real plans (for clusters this CI machine cannot run).

Needs: `apt-get install -y chromium` and `pip install playwright`; `require_browser()` skips without them.
"""

from __future__ import annotations

import importlib.util
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser() -> None:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright; the browser is Debian's chromium)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)")


def open_browser(p: Any) -> Any:
    """Debian's Chromium through Playwright (`p` is sync_playwright()'s object). No `playwright install`."""
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@contextmanager
def dashboard_page(url: str, height: int = 900) -> Iterator[Any]:
    """The server's /dashboard in a 1400-wide headless page, yielded once a shard row is drawn; closed after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = open_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.goto(url + "/dashboard")
            page.wait_for_selector(".shard-row", timeout=60_000)
            yield page
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    """The whole page as test-artifacts/`name`."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


@contextmanager
def plan_status_server(cluster: Any, model: str, plan: Any) -> Iterator[str]:
    """A minimal FastAPI app with the dashboard (observability.install) whose /api/distributed/status answers, in
    the server's shape, `cluster`'s nodes (scheduler ClusterSpec) and `model` running `plan` (a PartitionPlan);
    yields its URL."""
    from fastapi import FastAPI

    from ollama_distributed.api import observability

    from .live_app import serve_app

    app = FastAPI()
    observability.install(app)
    status = {"nodes": [{"id": f"id-{n.name}", "name": n.name, "address": "10.0.0.%d" % i, "state": "alive",
                         "resources": {"memory_budget": n.memory_bytes},
                         "measured": {"memory_bandwidth": n.memory_bandwidth, "flops": n.flops}}
                        for i, n in enumerate(cluster.nodes)],
              "models": [{"name": model, "plans": [plan.to_dict()], "engine": {"running": 0, "waiting": 0}}]}
    app.get("/api/distributed/status")(lambda: status)
    app.get("/api/ps")(lambda: {"models": []})
    srv = serve_app(app)
    try:
        yield srv.url
    finally:
        srv.stop()
