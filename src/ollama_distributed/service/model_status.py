"""What the API shows of loaded models: /api/ps items, each replica's placement, fault-tolerance state."""

from __future__ import annotations

import logging
import math
import os
import socket
from datetime import datetime, timedelta, timezone
from typing import Any

log = logging.getLogger(__name__)


def recovery_status(manager: Any) -> dict[str, Any]:
    """Fault-tolerance state for the API: per-node failure counts / back-off, and each model's recent
    recoveries (what failed, how long re-placing took, which nodes were left out), over all its replicas."""
    nodes = manager._node_health.to_dict() if manager._node_health is not None else {}
    models = {}
    for r in manager.runners():
        recs = [rec for rep in r.replicas if rep.recovery is not None for rec in rep.recovery.records]
        if not any(rep.recovery is not None for rep in r.replicas):
            continue
        models[r.name] = {
            "unplaced": r.unplaced,
            "dropped_replicas": sum(1 for rep in r.replicas if rep.dropped),
            "recoveries": [{"kind": rec.report.kind, "detail": rec.report.detail, "seconds": round(rec.seconds, 3),
                            "excluded": list(rec.excluded), "error": rec.error, "time": rec.at}
                           for rec in sorted(recs, key=lambda x: x.at)],
        }
    return {"nodes": nodes, "models": models}


def placements(runner: Any) -> list[dict[str, Any]]:
    """Each live replica's plan JSON with node_id/pid per shard: the executor's own `placement()` when it has
    one (the Ray executor), else the in-process single-shard plan."""
    out = []
    for rep in runner.live_replicas:
        fn = getattr(rep.executor.inner, "placement", None)
        plan = None
        if callable(fn):
            try:
                plan = fn()
            except Exception as exc:  # noqa: BLE001 - status must not fail because a node is unreachable
                log.warning("placement() of %s failed: %s", runner.name, exc)
        out.append(plan if plan is not None else local_plan(runner.name, rep.executor.config, runner.entry.size))
    return out


def ps_entry(manager: Any, runner: Any) -> dict[str, Any]:
    """One `/api/ps` item (+ our `placement` summary over every replica and live engine counters)."""
    entry = runner.entry
    exp = runner.expires_at
    if math.isinf(exp):
        expires = datetime.now(timezone.utc) + timedelta(days=365 * 100)
    else:
        expires = datetime.fromtimestamp(exp, timezone.utc)
    plans = placements(runner)
    summaries = []
    for plan in plans:
        shards = [s for st in plan.get("stages", []) for s in st.get("shards", [])]
        summaries.append({"strategy": plan.get("strategy", "single"), "stages": len(plan.get("stages", [])),
                          "nodes": sorted({str(s.get("node_id", s.get("node"))) for s in shards}),
                          "shards": len(shards)})
    first = summaries[0]
    return {
        "name": runner.name,
        "model": runner.name,
        "size": entry.size,
        "digest": entry.digest,
        "details": entry.details,
        "expires_at": expires.isoformat(),
        "size_vram": 0,
        "context_length": runner.context_length,
        "placement": {**first, "nodes": sorted({n for s in summaries for n in s["nodes"]}),
                      "shards": sum(s["shards"] for s in summaries), "replicas": summaries},
        "engine": {**runner.engine.stats(), "kv_sequences": runner.executor.live_sequences},
    }


def local_node_id() -> str:
    """Identity of this process's node for in-process execution: the Ray node id when Ray is up here, else
    `local:<hostname>`."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - Ray is optional for in-process serving
        pass
    return f"local:{socket.gethostname()}"


def local_plan(name: str, cfg: Any, memory_bytes: int) -> dict[str, Any]:
    """The scheduler's plan JSON for in-process execution: one stage, one shard on this node, this process."""
    from ..scheduler.plan import PartitionPlan, Prediction, ShardAssignment, StageSpec

    node = local_node_id()
    shard = ShardAssignment(node=node, heads=(0, cfg.n_heads), kv_heads=(0, cfg.n_kv_heads), ffn=(0, cfg.ffn_size),
                            memory_bytes=int(memory_bytes))
    plan = PartitionPlan(
        model=name, strategy="single", stages=(StageSpec((0, cfg.n_layers), (shard,)),),
        # In-process serving is not planned by the cost model, so there is no prediction to report.
        predicted=Prediction(0.0, 0.0, 0.0), reason="in-process LocalExecutor (server started without a cluster)",
    ).to_dict()
    for stage in plan["stages"]:
        for sh in stage["shards"]:
            sh["node_id"] = node
            sh["pid"] = os.getpid()
    return plan
