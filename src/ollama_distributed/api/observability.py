"""Observability endpoints: Prometheus metrics, the partition manager's learning state, decision events, and
the dashboard (static HTML/JS/CSS that polls the JSON endpoints).

  GET /metrics                        Prometheus text format (ServerMetrics' dedicated registry)
  GET /api/distributed/strategies     manager metrics and weights, calibration factors, running plans
  GET /api/distributed/history        selection history (predicted vs measured), calibration reports, autotunes
  GET /api/distributed/events         recent decisions (?since=ID&limit=N&kind=K&model=M)
  GET /api/distributed/live           per-model tokens/s, queue, measured and predicted ms/token
  GET /dashboard                      the dashboard page (+ /dashboard/dashboard.js, /dashboard/dashboard.css)

Wiring (in create_app, before the app starts): `observability.install(app)` — adds the request-counting
middleware, includes this router and keeps the LearningLoop in `app.state.observability`. Server state (loaded
models, nodes) is read at request time from `app.state.od` (api/common.py AppState) when it exists.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..service.learning import LearningLoop
from ..service.metrics import RequestMetricsMiddleware, StrategyCollector

log = logging.getLogger(__name__)
router = APIRouter()

STATIC = Path(__file__).parent / "static"
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def install(app: FastAPI, loop: LearningLoop | None = None) -> LearningLoop:
    """Add the metrics middleware and this router to `app`; returns the LearningLoop handlers report to."""
    loop = loop or LearningLoop()
    app.state.observability = loop
    loop.metrics.registry.register(StrategyCollector(loop.manager))
    app.add_middleware(RequestMetricsMiddleware, metrics=loop.metrics)
    app.include_router(router)
    return loop


def learning(request: Request) -> LearningLoop:
    loop = getattr(request.app.state, "observability", None)
    if not isinstance(loop, LearningLoop):
        raise HTTPException(503, "observability is not installed on this server (call api.observability.install)")
    return loop


def _model_manager(request: Request) -> Any:
    od = getattr(request.app.state, "od", None)
    return getattr(od, "manager", None)


def _engines(manager: Any) -> list[tuple[str, dict[str, Any]]]:
    if manager is None:
        return []
    out = []
    for r in manager.runners():
        try:
            out.append((r.name, dict(r.engine.stats())))
        except Exception as exc:  # noqa: BLE001 - one broken runner must not hide the others
            log.warning("engine stats of %s unavailable: %s", r.name, exc)
    return out


def _nodes(manager: Any) -> list[dict[str, Any]]:
    """Nodes as /api/distributed/status lists them. A scrape never starts a Ray cluster: when the server is
    distributed and no model has created the cluster yet, there is nothing to report."""
    if manager is None:
        return []
    if getattr(manager.settings, "distributed", False) and getattr(manager, "_cluster", None) is None:
        return []
    from .distributed import distributed_status

    nodes: list[dict[str, Any]] = distributed_status(manager)["nodes"]
    return nodes


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    loop = learning(request)
    manager = _model_manager(request)
    try:
        nodes = await asyncio.to_thread(_nodes, manager)
    except Exception as exc:  # noqa: BLE001 - node metrics are best effort; the rest still answers
        log.warning("node status for /metrics failed: %s", exc)
        nodes = None
    loop.metrics.set_engines(_engines(manager))
    if nodes is not None:
        factors = loop.calibrator.node_factors() if loop.calibrator else {}
        loop.metrics.set_nodes(nodes, factors)
    return Response(loop.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/distributed/strategies")
async def strategies(request: Request) -> dict[str, Any]:
    return learning(request).strategies()


@router.get("/api/distributed/history")
async def history(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> dict[str, Any]:
    return learning(request).history(limit)


@router.get("/api/distributed/events")
async def events(request: Request, since: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=10_000),
                 kind: str | None = None, model: str | None = None) -> dict[str, Any]:
    log_ = learning(request).events
    items = log_.recent(limit=limit, since_id=since, kind=kind, model=model)
    return {"events": [e.to_dict() for e in items], "counts": log_.counts(), "capacity": log_.capacity}


@router.get("/api/distributed/live")
async def live(request: Request) -> dict[str, Any]:
    loop = learning(request)
    rates = loop.metrics.tokens_per_s()
    running = loop.strategies()["running"]
    models = {}
    for name, stats in _engines(_model_manager(request)):
        models[name] = {"tokens_per_s": rates.get(name, 0.0), **stats, **running.get(name, {})}
    for name, rate in rates.items():
        models.setdefault(name, {"tokens_per_s": rate, **running.get(name, {})})
    return {"models": models, "tokens_per_s": sum(rates.values())}


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html")


@router.get("/dashboard/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> FileResponse:
    if name not in _ASSETS:  # a fixed list: no path from the client reaches the filesystem
        raise HTTPException(404, f"no dashboard asset {name!r}")
    return FileResponse(STATIC / name, media_type=_ASSETS[name])
