"""Replicas of one loaded model: each its own executor + engine (+ recovery on a Ray cluster), behind a router.

A model the cluster can hold more than once is placed as up to `max_replicas` copies on disjoint nodes
(scheduler/planner.py `plan_replicas`); `service/router.py ReplicaRouter` sends each request to the replica that
would finish it soonest. This module holds what the model manager keeps per replica and the facade the request
path sees as "the executor" (`RoutedExecutors`). Grammar constraints travel inside each request (its sampler),
so they apply on whichever replica the router chose.

Recovery is per replica (runtime/recovery.py): a replica re-plans on the nodes no other replica uses
(`ReplicaHealth` adds them to the nodes it must not plan on); when they cannot hold it and another replica is
still placed, the replica is dropped from routing (its in-flight requests end with the shortfall, new requests go
to the others) and closed once idle.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from .live_executor import LiveExecutor
from .router import ReplicaRouter, SlowedExecutor

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """One copy of a model: its (constrained) executor, engine and, on a Ray cluster, its recovery."""

    executor: LiveExecutor
    engine: Any
    recovery: Any | None = None
    dropped: bool = False  # removed from routing (could not be re-placed); closed by the manager once idle
    added_at: float = field(default_factory=time.time)

    @property
    def unplaced(self) -> bool:
        from ..runtime.recovery import UnplacedExecutor

        return isinstance(self.executor.inner, UnplacedExecutor)

    def placement(self) -> dict[str, Any]:
        fn = getattr(self.executor.inner, "placement", None)
        return fn() if callable(fn) else {"stages": []}

    def nodes(self) -> set[str]:
        """Node names this replica's shards run on (empty for in-process or unplaced)."""
        try:
            stages = self.placement().get("stages", [])
        except Exception as exc:  # noqa: BLE001 - a broken executor holds no node any more
            log.debug("placement of a replica failed: %s", exc)
            return set()
        return {str(sh.get("node")) for st in stages for sh in st.get("shards", [])}

    def idle(self) -> bool:
        st = self.engine.stats()
        return st.get("waiting", 0) == 0 and st.get("running", 0) == 0


class RoutedExecutors:
    """What the request path (service/generation.py) uses as `runner.executor` for a replicated model: the model
    config, sizes and live sequences over every replica; `lock` is the router's locked submission."""

    def __init__(self, router: ReplicaRouter) -> None:
        self.router = router

    @property
    def config(self) -> Any:
        return self.router.replicas[0].executor.config

    @property
    def max_seq_len(self) -> int:
        return min(int(r.executor.max_seq_len) for r in self.router.replicas)

    @property
    def live_sequences(self) -> int:
        return sum(int(r.executor.live_sequences) for r in self.router.replicas)

    @property
    def lock(self) -> Any:
        return self.router.locked_submission()

    @property
    def inner(self) -> Any:
        return self.router.replicas[0].executor.inner


class ReplicaHealth:
    """The server's NodeHealth as one replica's Recovery sees it: nodes other replicas hold are also "not to
    plan on" (their memory budget is taken), so a re-placed replica stays disjoint from the others."""

    def __init__(self, shared: Any, others: Callable[[], set[str]]) -> None:
        self.shared = shared
        self.others = others

    @property
    def policy(self) -> Any:
        return self.shared.policy

    def record_failure(self, node: str, now: float | None = None) -> bool:
        return bool(self.shared.record_failure(node, now))

    def backed_off(self, now: float | None = None) -> set[str]:
        return set(self.shared.backed_off(now)) | set(self.others())

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        return dict(self.shared.to_dict(now))


def slowed(executor: Any, slow_nodes: Sequence[tuple[str, float]]) -> Any:
    """TEST HOOK (settings.test_slow_nodes): wrap `executor` in SlowedExecutor when it has a shard on a listed
    node — each step then sleeps the sum of those nodes' delays. Unchanged otherwise."""
    if not slow_nodes:
        return executor
    try:
        stages = executor.placement().get("stages", [])
    except Exception:  # noqa: BLE001 - an executor without a placement runs on no named node
        return executor
    used = {str(sh.get("node")) for st in stages for sh in st.get("shards", [])}
    delay = sum(d for n, d in slow_nodes if n in used)
    if delay <= 0:
        return executor
    log.warning("TEST HOOK: every step on %s sleeps %.3f s (OLLAMA_DISTRIBUTED_TEST_SLOW_NODES)", sorted(used), delay)
    return SlowedExecutor(executor, delay)


def usable_nodes(cluster: Any, exclude: Iterable[str] = ()) -> list[str]:
    skip = set(exclude)
    return [n.name for n in cluster.nodes() if n.name not in skip]


class Planned(NamedTuple):
    """plan_on's answer: the replica plans, the planning inputs (profile, spec, workload) and the weight sources
    they were made with (what each node would fetch; runtime/recovery.py weight_sources_for)."""

    plans: list[Any]
    inputs: Any
    sources: Any


def plan_on(model_path: str | Path, cluster: Any, keep: Iterable[str], strategy: str, dtype: Any,
            max_replicas: int = 1, kv_cache_type: str | None = None) -> Planned:
    """Replica plans (scheduler plan_replicas) on the nodes `keep` of `cluster`, with the planning inputs for
    weight format `dtype` and its KV cache type (None: the format's default) and the nodes' weight sources.
    Raises scheduler InfeasiblePlanError when not even one copy fits."""
    from ..runtime.recovery import planning_inputs, weight_sources_for
    from ..scheduler.config import PlanConfig
    from ..scheduler.errors import InfeasiblePlanError
    from ..scheduler.planner import plan_replicas

    keep = list(keep)
    if not keep:
        raise InfeasiblePlanError("no node left to place a replica on")
    measurement = cluster.measure()
    inputs = planning_inputs(model_path, measurement, keep, dtype, kv_cache_type)
    sources = weight_sources_for(model_path, cluster, measurement, keep)  # what each node fetches; holders preferred
    plans = plan_replicas(*inputs, PlanConfig(strategy=strategy), max_replicas, sources)
    return Planned(plans, inputs, sources)


def predicted_ms(plan: Any, inputs: Any) -> float:
    """`plan`'s predicted decode ms/token on the planning inputs' cluster (a plan made on an older measurement
    is re-evaluated on this one, so two plans compare on the same numbers)."""
    from ..scheduler.config import PlanConfig
    from ..scheduler.planner import cost_model

    profile, spec, workload = inputs
    cm = cost_model(profile, spec, workload, PlanConfig())
    return float(cm.evaluate(plan.stages)[0].decode_ms_per_token)


def build_router(replicas: Sequence[Replica]) -> ReplicaRouter:
    return ReplicaRouter([r.engine for r in replicas], executors=[r.executor for r in replicas])


def place_model(manager: Any, name: str, path: Path) -> list[Any]:
    """Executors for the replicas the cluster holds (up to max_replicas, on disjoint usable nodes); a single
    copy is autotuned when the settings allow and more than one layout is feasible. Raises scheduler
    InfeasiblePlanError when not even one copy fits."""
    from . import autotune as tuning

    s = manager.settings
    cluster = manager.cluster()
    keep = usable_nodes(cluster, manager.node_health().backed_off())
    plans, inputs, sources = plan_on(path, cluster, keep, s.strategy, manager.torch_dtype(), s.max_replicas,
                                     s.kv_cache_type)
    build = manager.builder(path)
    if len(plans) == 1 and s.autotune and s.strategy == "auto":
        # the candidates carry load costs and prefer holders, as plan_on's plans do
        cands = tuning.candidates(inputs, s.autotune_candidates, sources)
        if len(cands) > 1:
            return [tuning.autotune(name, cands, build, s.autotune_steps, manager.learning)[0]]
        log.info("autotune of %s skipped: one feasible layout", name)
    executors: list[Any] = []
    try:
        for p in plans:
            executors.append(build(p))
    except BaseException:
        for ex in executors:
            ex.close()
        raise
    if len(plans) > 1 and manager.learning is not None:
        manager.learning.events.record("replicas", f"{name}: {len(plans)} replicas on "
                                    + "; ".join(",".join(sorted(set(p.nodes))) for p in plans), model=name)
    return executors


def replica_recovery(manager: Any, runner: Any, replica: Replica) -> Any:
    """One replica's engine recover callback on the Ray cluster (runtime/recovery.py): re-plan on the surviving
    nodes no other replica holds, record the failure against the strategy in the learning loop, back off
    flaky nodes. When the replica cannot be re-placed but another one serves, it is dropped from routing."""
    from ..runtime.recovery import Recovery

    learning = manager.learning
    name, path = runner.name, runner.entry.model_path

    def others() -> set[str]:
        return {n for r in runner.live_replicas if r is not replica for n in r.nodes()}

    def on_event(rec: Any) -> None:
        serving = [r for r in runner.live_replicas if r is not replica and not r.unplaced]
        if rec.error is not None and serving and runner.router is not None:
            runner.router.remove(replica.engine)
            replica.dropped = True
            log.warning("replica of %s dropped (%s); %d replica(s) keep serving", name, rec.error, len(serving))
        if learning is None:
            return
        # the failure counts against the strategy that was running (PartitionManager via the loop)
        learning.report(name, None, success=False, error=f"{rec.report.kind}: {rec.report.detail}")
        if rec.error is None:
            nodes = ",".join(rec.report.failed_nodes) or None
            learning.record_recovery(name, f"{rec.report.detail}; re-planned in {rec.seconds:.2f} s "
                                     f"(excluded: {', '.join(rec.excluded) or 'none'})", node=nodes)
            # attach may measure the cluster (seconds): keep it off the engine thread
            threading.Thread(target=_quietly, args=(manager.attach_learning, runner, rec.placement),
                             daemon=True).start()
        elif replica.dropped:
            learning.events.record("replica_dropped", f"{name}: a replica could not be re-placed ({rec.error}); "
                                   f"{len(serving)} replica(s) keep serving", level="warning", model=name)
        else:
            learning.events.record("recovery_failed", f"{name}: {rec.error}", level="error", model=name)

    build = manager.builder(path)
    return Recovery(path, manager.cluster(), manager.settings.strategy, manager.torch_dtype(),
                    ReplicaHealth(manager.node_health(), others), on_event, build=build,
                    kv_cache_type=manager.settings.kv_cache_type)


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the learning loop is advisory
        log.warning("learning-loop update failed: %s", exc)
