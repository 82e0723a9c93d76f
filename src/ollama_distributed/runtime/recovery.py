"""Recovering a distributed model after a shard or node is lost (issue 6).

The engine (engine.py) calls a `recover(exc, failed_executor)` callback when a step raises, and replays every
running sequence (prompt + generated tokens) onto whatever executor the callback returns; this module builds that
callback for the Ray executor:

1. classify the failure (`classify_failure`): which nodes of the failed plan are gone — Ray's GCS view, sharpened
   by a direct TCP probe of each raylet's node-manager port (refused at once when the raylet died, so a lost node
   is known before the GCS health check declares it dead) — and which shard worker processes died on nodes that
   live on (their pid is gone: checked on nodes of this machine), and which shards hung (the executor's adaptive
   step time-out found them not answering a liveness probe and killed them: ShardLostError names their nodes);
2. note the failure against those nodes (`NodeHealth`: a node that failed `failures` times within `window_s` is
   backed off — not planned on — until it has been failure-free for `backoff_s`);
3. keep the failed executor's shards that are alive and idle (`detach_survivors`: weights kept, caches and
   process groups reset), close the rest (dead, hung, or stuck in a recv for a dead peer), wait for the GCS to
   agree that lost nodes are gone, and ask the scheduler for a new plan on the surviving, not backed-off nodes,
   reusing the measurements taken at load time for nodes that were already measured;
4. start that plan, taking over the kept shards where the new plan has the same shard on the same node (after a
   worker died and its node lives the plan is usually unchanged, so only the lost shard starts). If the survivors
   cannot hold the model, return an `UnplacedExecutor` whose every step raises
   `CapacityError` naming the shortfall, so the affected requests end with that message and the owner (service/
   models.py) can re-place the model when capacity returns.

Ray's own detection of a killed *worker process* is fast (the driver's actor call fails with RayActorError as soon
as the raylet reports the process exit); a killed *node* is declared dead by the GCS after its health-check window
(runtime/cluster.py HealthConfig: about 2-3 s for local clusters, ~15 s with Ray's defaults).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .executor import ExecutorError, ShardLostError

log = logging.getLogger(__name__)

_LOCAL_ADDRESSES = {"127.0.0.1", "localhost", "::1"}


class CapacityError(ExecutorError):
    """The surviving nodes cannot hold the model; `needed_bytes`/`available_bytes` carry the shortfall."""

    def __init__(self, message: str, needed_bytes: int = 0, available_bytes: int = 0) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


@dataclass(frozen=True)
class BackoffPolicy:
    """When a node that keeps failing stops being planned on.

    failures: failures within `window_s` seconds that back a node off. backoff_s: failure-free time a backed-off
    node needs before it is planned on again. settle_s: longest wait for Ray's GCS to declare a lost node dead
    before re-planning (its health-check window; runtime/cluster.py HealthConfig).
    """

    failures: int = 3
    window_s: float = 300.0
    backoff_s: float = 60.0
    settle_s: float = 20.0

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError(f"BackoffPolicy.failures must be >= 1, got {self.failures}")
        for name in ("window_s", "backoff_s", "settle_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"BackoffPolicy.{name} must be >= 0, got {getattr(self, name)}")


class NodeHealth:
    """Failure bookkeeping per node name (thread-safe; one per server, shared by its models)."""

    def __init__(self, policy: BackoffPolicy = BackoffPolicy(), clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}
        self._drained: set[str] = set()  # taken out of service by an operator (`node drain`), until undrained

    def drain(self, node: str) -> None:
        """Plan nothing on `node` any more (an operator's `ollama-distributed node drain`)."""
        with self._lock:
            self._drained.add(node)

    def undrain(self, node: str) -> None:
        with self._lock:
            self._drained.discard(node)

    def record_failure(self, node: str, now: float | None = None) -> bool:
        """Note one failure of `node`; True when the node is (now) backed off."""
        now = self._clock() if now is None else now
        with self._lock:
            times = [t for t in self._failures.get(node, []) if now - t <= self.policy.window_s]
            times.append(now)
            self._failures[node] = times
        backed = node in self.backed_off(now)
        if backed:
            log.warning("node %s failed %d times within %.0f s: backed off for %.0f s", node, len(times),
                        self.policy.window_s, self.policy.backoff_s)
        return backed

    def backed_off(self, now: float | None = None) -> set[str]:
        """Nodes not to plan on now: drained ones, and those with `failures` failures within the window, the last
        less than backoff_s ago."""
        now = self._clock() if now is None else now
        p = self.policy
        with self._lock:
            return set(self._drained) | {
                node for node, times in self._failures.items()
                if times and now - times[-1] < p.backoff_s
                and sum(1 for t in times if times[-1] - t <= p.window_s) >= p.failures
            }

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        now = self._clock() if now is None else now
        off = self.backed_off(now)
        with self._lock:
            out: dict[str, Any] = {node: {"failures": len(times), "last_failure_s_ago": round(now - times[-1], 1),
                                          "backed_off": node in off} for node, times in self._failures.items()}
            for node in self._drained:
                out.setdefault(node, {"failures": 0, "backed_off": True})["drained"] = True
            return out


@dataclass(frozen=True)
class FailureReport:
    """What a failed step lost. kind: "node_lost" (a node of the plan is gone), "hung" (a shard stopped answering
    and was killed: ShardLostError), "worker_died" (a shard's process died, its node lives), "timeout" (a step
    took too long while every shard answered), "capacity" (the model was not placed), or "unknown".
    lost_nodes: node names that are gone; failed_nodes: every node a failure is recorded against."""

    kind: str
    lost_nodes: tuple[str, ...]
    failed_nodes: tuple[str, ...]
    detail: str


def raylet_reachable(address: str, port: int, timeout: float = 0.5) -> bool:
    """Whether the raylet's node-manager port accepts a TCP connection: a killed raylet refuses at once, much
    sooner than the GCS health check declares its node dead."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    return list(ray.nodes())


def node_states(cluster: Any) -> dict[str, dict[str, Any]]:
    """node_id → {"name", "address", "alive"}: alive means the GCS says so AND its raylet answers."""
    names = {n.node_id: n.name for n in cluster.nodes(include_dead=True)}
    out: dict[str, dict[str, Any]] = {}
    for raw in _ray_nodes():
        nid = raw["NodeID"]
        alive = bool(raw.get("Alive"))
        port = raw.get("NodeManagerPort")
        if alive and port:
            alive = raylet_reachable(raw["NodeManagerAddress"], int(port))
        prev = out.get(nid)
        if prev is None or alive:
            out[nid] = {"name": names.get(nid, nid[:8]), "address": raw["NodeManagerAddress"], "alive": alive}
    return out


def classify_failure(exc: BaseException, placement: dict[str, Any], states: dict[str, dict[str, Any]],
                     pid_alive: Callable[[int], bool] = _pid_alive) -> FailureReport:
    """Which nodes of `placement` (a plan JSON whose shards carry node_id/pid) were lost or lost a worker."""
    lost: list[str] = []
    died: list[str] = []
    for stage in placement.get("stages", []):
        for sh in stage.get("shards", []):
            st = states.get(sh.get("node_id", ""))
            name = st["name"] if st else str(sh.get("node"))
            if st is None or not st["alive"]:
                if name not in lost:
                    lost.append(name)
            elif st["address"] in _LOCAL_ADDRESSES and isinstance(sh.get("pid"), int) and not pid_alive(sh["pid"]):
                if name not in died:
                    died.append(name)
    text = str(exc)
    hung = [n for n in (exc.nodes if isinstance(exc, ShardLostError) else ()) if n not in lost]
    if isinstance(exc, CapacityError):
        kind = "capacity"
    elif lost:
        kind = "node_lost"
    elif hung:
        kind = "hung"
        died = hung + [n for n in died if n not in hung]
    elif died:
        kind = "worker_died"
    elif "did not finish within" in text:
        kind = "timeout"
    else:
        kind = "unknown"
    failed = tuple(lost + [n for n in died if n not in lost])
    detail = {"node_lost": f"lost node(s) {', '.join(lost)}", "worker_died": f"shard worker died on {', '.join(died)}",
              "hung": f"shard worker hung on {', '.join(hung)}"}.get(kind, text)
    return FailureReport(kind, tuple(lost), failed, detail)


class UnplacedExecutor:
    """Stands in for a model the cluster can no longer hold: every step raises the CapacityError it was made
    with (so the engine ends the affected requests with that message). The owner re-places the model later."""

    def __init__(self, config: Any, max_seq_len: int, error: CapacityError) -> None:
        self.config = config
        self.max_seq_len = max_seq_len
        self.error = error

    def step(self, seq_ids: list[int], tokens: list[list[int]]) -> Any:
        raise self.error

    def embed(self, tokens: list[int]) -> Any:
        raise self.error

    def free(self, seq_id: int) -> None:
        return None

    def close(self) -> None:
        return None

    def placement(self) -> dict[str, Any]:
        return {"strategy": "unplaced", "stages": [], "reason": str(self.error)}


@dataclass
class RecoveryRecord:
    """One recovery, for events and the benchmark: what failed, what was planned, how long it took."""

    report: FailureReport
    seconds: float
    placement: dict[str, Any] | None = None
    error: str | None = None
    excluded: tuple[str, ...] = ()
    at: float = field(default_factory=time.time)
    reused_shards: int = 0  # shards of the failed executor the new one took over (not restarted)
    start_s: float | None = None  # time the new executor took to start its shards and connect them


class Recovery:
    """The engine's `recover` callback for one model on a Ray cluster (see module docstring).

    build: (plan) → executor; default `runtime.distributed_run.build_executor(path, cluster, plan=..., dtype=...)`.
    on_event: called with each RecoveryRecord (after a success or a capacity failure), on the engine thread.
    reuse_survivors: let the new executor take over the failed one's live shards (see RayExecutor.reuse);
      False restarts every shard (the behaviour before; bench/recovery_bench.py compares the two).
    kv_cache_type: the model's KV cache setting (f32|f16|q8_0; None: the weight format's default), for re-plans
      and the default build.
    measurement: the cluster measurement (runtime/measure.py) to re-plan with (None: the cluster's, taken now).

    Re-plans prefer, among survivors predicted near-equal, the nodes that hold the model file or the lost shard's
    cached slice (scheduler/load_cost.py prefer_holders), and each new plan says what its nodes fetch.
    """

    def __init__(self, model_path: str | Path, cluster: Any, strategy: str = "auto", dtype: Any = None,
                 health: NodeHealth | None = None, on_event: Callable[[RecoveryRecord], None] | None = None,
                 build: Callable[[Any], Any] | None = None, reuse_survivors: bool = True,
                 kv_cache_type: str | None = None, measurement: Any = None) -> None:
        import torch

        self.model_path = Path(model_path)
        self.cluster = cluster
        self.strategy = strategy
        self.dtype = dtype if dtype is not None else torch.float32
        self.kv_cache_type = kv_cache_type
        self.health = health or NodeHealth()
        self.on_event = on_event
        self._build = build
        self.reuse_survivors = reuse_survivors
        self.records: list[RecoveryRecord] = []
        # The measurements the model was planned with (the cluster caches them, so this costs nothing right
        # after a load). Re-planning on a subset of these nodes reuses them: the survivors did not get slower,
        # and probing again (the cluster re-measures whenever its set of alive nodes changes) costs seconds.
        self._measurement: Any = measurement
        if cluster is not None and measurement is None:
            try:
                self._measurement = cluster.measure()
            except Exception as exc:  # noqa: BLE001 - re-planning measures again if needed
                log.warning("no cluster measurement to reuse for recovery: %s", exc)

    def __call__(self, exc: Exception, failed: Any) -> Any:
        t0 = time.perf_counter()
        if isinstance(failed, UnplacedExecutor):
            # Its requests end with the capacity error; re-placing is the owner's job (at the next load), not
            # something to retry in a tight loop on the engine thread.
            return None
        states = node_states(self.cluster)
        placement = _placement_of(failed)
        report = classify_failure(exc, placement, states)
        for node in report.failed_nodes:
            self.health.record_failure(node)
        log.warning("executor failure (%s): %s; re-planning", report.kind, report.detail)
        # Shards that are alive and idle keep their weights for the new plan (rebuilding only what was lost);
        # the rest are killed by close(): they are dead, hung, or stuck waiting for a dead peer.
        survivors: list[Any] = []
        if self.reuse_survivors and callable(getattr(failed, "detach_survivors", None)):
            try:
                survivors = failed.detach_survivors()
            except Exception as det_exc:  # noqa: BLE001 - fall back to starting every shard afresh
                log.warning("keeping the surviving shards failed: %s", det_exc)
        try:
            failed.close()
        except Exception as close_exc:  # noqa: BLE001 - it is broken anyway
            log.warning("closing the failed executor: %s", close_exc)
        lost_ids = {nid for nid, st in states.items() if not st["alive"]}
        self._wait_gcs_agrees(lost_ids)
        excluded = tuple(sorted(set(report.lost_nodes) | self.health.backed_off()))
        try:
            new = self.place(exclude=set(excluded), reuse=survivors)
        except CapacityError as cap:
            _release(survivors)
            rec = RecoveryRecord(report, time.perf_counter() - t0, error=str(cap), excluded=excluded)
            self._emit(rec)
            return UnplacedExecutor(failed.config, failed.max_seq_len, cap)
        rec = RecoveryRecord(report, time.perf_counter() - t0, placement=_placement_of(new), excluded=excluded,
                             reused_shards=int(getattr(new, "reused_shards", 0)), start_s=getattr(new, "start_s", None))
        log.warning("recovered from %s in %.2f s", report.detail, rec.seconds)
        self._emit(rec)
        return new

    def place(self, exclude: Iterable[str] = (), reuse: Sequence[Any] = ()) -> Any:
        """A new executor on a plan over the alive nodes not in `exclude`; CapacityError when none fits.
        reuse: live shards of the failed executor (RayExecutor.detach_survivors) the new one may take over."""
        from ..scheduler.errors import InfeasiblePlanError

        try:
            chosen = self.plan(exclude)
        except InfeasiblePlanError as exc:
            raise CapacityError(f"the surviving nodes cannot hold the model: {exc}",
                                exc.needed_bytes, exc.available_bytes) from exc
        if self._build is not None:
            _release(reuse)
            return self._build(chosen)
        from .distributed_run import build_executor

        try:
            return build_executor(self.model_path, self.cluster, plan=chosen, dtype=self.dtype,
                                  kv_cache_type=self.kv_cache_type, reuse=tuple(reuse))
        except BaseException:
            _release(reuse)  # the executor kills what it took over when its start fails; the rest here
            raise

    def plan(self, exclude: Iterable[str] = ()) -> Any:
        """The scheduler's plan on the alive nodes minus `exclude` (mirrors distributed_run.plan_for_cluster,
        which cannot leave nodes out). Raises scheduler InfeasiblePlanError."""
        from ..scheduler.config import PlanConfig
        from ..scheduler.errors import InfeasiblePlanError
        from ..scheduler.planner import plan

        exclude = set(exclude)
        keep = {n.name for n in self.cluster.nodes()} - exclude
        if not keep:
            raise InfeasiblePlanError(f"no usable node left (excluded: {', '.join(sorted(exclude)) or 'none'})")
        m = self._measurement
        if m is None or not keep <= {n.name for n in m.nodes}:
            m = self._measurement = self.cluster.measure()  # a node joined since: probe (cached by the cluster)
        profile, spec, workload = planning_inputs(self.model_path, m, keep, self.dtype, self.kv_cache_type)
        # among near-equal survivors, the nodes that hold the file or the lost shard's cached slice
        sources = weight_sources_for(self.model_path, self.cluster, m, keep)
        chosen = plan(profile, spec, workload, PlanConfig(strategy=self.strategy), sources)
        log.info("recovery plan on %s: %s — %s", sorted(keep), chosen.strategy, chosen.reason)
        return chosen

    def _wait_gcs_agrees(self, lost_ids: set[str]) -> None:
        """Wait (bounded) until the GCS no longer lists lost nodes as alive: measuring or placing on a node it
        still believes alive would wait for a dead raylet."""
        if not lost_ids:
            return
        deadline = time.monotonic() + self.health.policy.settle_s
        while time.monotonic() < deadline:
            if not lost_ids & {n.node_id for n in self.cluster.nodes()}:
                return
            time.sleep(0.1)
        log.warning("the GCS still lists lost node(s) %s as alive after %.0f s", lost_ids,
                    self.health.policy.settle_s)

    def _emit(self, rec: RecoveryRecord) -> None:
        self.records.append(rec)
        del self.records[:-100]
        if self.on_event is not None:
            try:
                self.on_event(rec)
            except Exception:  # noqa: BLE001 - bookkeeping must not break recovery
                log.exception("recovery event handler failed")


def planning_inputs(model_path: str | Path, measurement: Any, keep: Iterable[str], dtype: Any,
                    kv_cache_type: str | None = None) -> tuple[Any, Any, Any]:
    """(ModelProfile, ClusterSpec of the measured nodes in `keep`, Workload) as distributed_run.plan_for_cluster
    builds them (distributed_run.model_profile: the weight format's bytes, "auto" from the file's header, and the
    KV cache type), for planning on part of a cluster."""
    from .distributed_run import default_workload, model_profile
    from .measure import ClusterMeasurement, to_cluster_spec

    keep = set(keep)
    nodes = tuple(n for n in measurement.nodes if n.name in keep)
    links = tuple(l for l in measurement.links if l.a in keep and l.b in keep)
    profile = model_profile(model_path, dtype, kv_cache_type)
    return profile, to_cluster_spec(ClusterMeasurement(nodes, links)), default_workload(profile.context_length)


def weight_sources_for(model_path: str | Path, cluster: Any, measurement: Any,
                       keep: Iterable[str] | None = None) -> Any:
    """Which nodes hold the model's weights (runtime/weight_fetch.py weight_sources, the scheduler's WeightSources),
    for planning; None when that cannot be told (a Hugging Face directory, or asking failed): the plan is then made
    as before, without load costs. keep: the nodes being planned on (None: every alive node)."""
    from .measure import to_cluster_spec
    from .weight_fetch import weight_sources

    try:
        return weight_sources(model_path, cluster, to_cluster_spec(measurement), only=keep)
    except Exception as exc:  # noqa: BLE001 - load costs inform a plan, they never stop one
        log.warning("planning without load costs: cannot tell which nodes hold %s: %s", Path(model_path).name, exc)
        return None


def _release(shards: Iterable[Any]) -> None:
    """Kill live shards nobody took over (LiveShard.actor)."""
    shards = list(shards)
    if not shards:
        return
    import ray

    for sh in shards:
        try:
            ray.kill(sh.actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("kill: %s", exc)


def _placement_of(executor: Any) -> dict[str, Any]:
    fn = getattr(executor, "placement", None)
    if callable(fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a broken executor may not describe itself
            log.debug("placement() failed: %s", exc)
    return {"stages": []}
