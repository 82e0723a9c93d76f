"""GET /api/distributed/status: the cluster's nodes and, per loaded model, its placement plans.

`{"nodes": [{"id", "address", "state", "resources", "measured"}], "models": [{"name", "plans": [PLAN, ...],
"engine": {...,"replicas": [...]}}]}` where PLAN is the scheduler's plan JSON (one per replica, in the order of
engine.replicas: the router's per-replica requests served, tokens, EMA speed and outstanding work) whose shards also carry "node_id" and "pid" — taken
from the executor's `placement()` (Ray executor) or, for in-process serving, this node and this process.
`"recovery"` adds the fault-tolerance state: node back-off and each model's recoveries.

POST /api/distributed/nodes/{node}/drain moves every model off a node now; POST /api/distributed/models/{model}/replan
queues a re-plan applied when the model is idle.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from fastapi import APIRouter, Request

from ..service.models import ModelManager, local_node_id
from .common import state
from .errors import APIError

router = APIRouter()
log = logging.getLogger(__name__)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _local_node(address: str) -> dict[str, Any]:
    mem = _meminfo()
    return {
        "id": local_node_id(),
        "address": address,
        "state": "alive",
        "resources": {"cpu": os.cpu_count() or 1, "memory_bytes": mem.get("MemTotal", 0)},
        "measured": {"memory_available_bytes": mem.get("MemAvailable", 0)},
    }


def _cluster_nodes(cluster: Any) -> list[dict[str, Any]]:
    """Nodes as Ray reports them (runtime.cluster.ClusterHandle), with the runtime's measurements (cached by the
    cluster; the executor measured them when it planned)."""
    measured: dict[str, dict[str, Any]] = {}
    try:
        for m in cluster.measure().nodes:
            measured[m.node_id] = m.to_dict()
    except Exception as exc:  # noqa: BLE001 - status still lists nodes when probing fails
        log.warning("node measurement unavailable: %s", exc)
    out = []
    for n in cluster.nodes(include_dead=True):
        out.append({
            "id": n.node_id,
            "name": n.name,
            "address": n.address,
            "state": "alive" if n.alive else "dead",
            "resources": {**dict(n.resources), "memory_budget": n.memory_budget},
            "measured": measured.get(n.node_id, {}),
        })
    return out


def distributed_status(manager: ModelManager) -> dict[str, Any]:
    """Blocking (may query Ray)."""
    if manager.settings.distributed:
        nodes = _cluster_nodes(manager.cluster())
    else:
        nodes = [_local_node(manager.settings.host)]
    models = []
    for runner in manager.runners():
        # one plan per replica (same order as engine["replicas"], the router's per-replica counters)
        models.append({"name": runner.name, "plans": manager.placements(runner),
                       "engine": {**runner.engine.stats(), "kv_sequences": runner.executor.live_sequences}})
    # fault tolerance: per-node failure counts / back-off and each model's recoveries (empty when in-process)
    # weight_transfers: nodes that lacked the model file and fetched their slices (bytes, rate, ETA per node)
    return {"nodes": nodes, "models": models, "recovery": manager.recovery_status(),
            "weight_transfers": manager.weight_transfers()}


@router.get("/api/distributed/status")
async def status(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(distributed_status, state(request).manager)


@router.post("/api/distributed/nodes/{node}/drain")
async def drain(request: Request, node: str) -> dict[str, Any]:
    """Move every model off `node` without failing requests; nothing is planned on it afterwards."""
    manager = state(request).manager
    if not manager.settings.distributed:
        raise APIError(400, "node drain needs a cluster (serve with --address or --local-nodes)")
    from ..runtime.cluster import NodeNotFoundError

    try:
        moved = await asyncio.to_thread(manager.drain, node)
    except NodeNotFoundError as exc:
        raise APIError(404, f"node '{node}' not found") from exc
    return {"node": node, "drained": True, "moved": moved}


@router.post("/api/distributed/models/{model}/replan")
async def replan(request: Request, model: str) -> dict[str, Any]:
    """Queue a re-plan of a loaded model (optionally `{"exclude": [NODE, ...]}`): the scheduler's plan on the
    usable nodes, applied between requests once the model is idle (like a drift proposal; /api/distributed/history
    → "selections" records it)."""
    manager = state(request).manager
    if not manager.settings.distributed:
        raise APIError(400, "re-planning needs a cluster (serve with --address or --local-nodes)")
    try:
        body = await request.json()
    except ValueError:
        body = {}
    exclude = (body or {}).get("exclude", []) if isinstance(body, dict) else []
    if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
        raise APIError(400, f"exclude must be a list of node names, got {exclude!r}")
    runner = next((r for r in manager.runners() if r.name in (model, f"{model}:latest")), None)
    if runner is None:
        raise APIError(404, f"model '{model}' is not loaded")
    from ..service.placement_loop import request_replan

    from ..scheduler.errors import InfeasiblePlanError

    try:
        proposal = await asyncio.to_thread(request_replan, manager, runner, set(exclude))
    except InfeasiblePlanError:
        raise  # 503 with the shortfall (api/errors.py)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    return {"model": runner.name, "current_plan_id": proposal.current_plan_id, "plan": proposal.plan.to_dict(),
            "reason": proposal.reason, "pending": True}
