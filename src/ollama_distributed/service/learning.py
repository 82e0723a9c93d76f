"""The learning loop: what the runtime measures flows back into the partition manager and the cost model.

Per finished request (or per measured step) the server reports strategy, plan id, prefill time, decode ms/token,
per-stage times and success or failure. `LearningLoop` sends each report to
  * the PartitionManager (`record`): per-strategy executions, success rate, EMA latency / throughput, weights;
  * the Calibrator (scheduler/calibration.py): per-node / per-link factors, so the cost model's prediction of the
    running plan converges to what is measured;
  * ServerMetrics and the EventLog (failures, recoveries, re-plan proposals are decisions people want to see);
and every `drift_every` reports asks the calibrated planner whether another layout would now be much faster
(`propose_replan`); a proposal waits in `pending_replan(model)` until the model is idle and the owner applies it
(`replan_applied`) or gives up on it (`replan_dismissed`); both land in the history's selections. Autotune on load: `autotune(model, trials)` keeps the fastest measured candidate and records why.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..scheduler.calibration import (AutotuneDecision, CalibrationConfig, Calibrator, ReplanProposal, StepTimings,
                                     Trial, pick_fastest)
from ..scheduler.cluster import ClusterSpec
from ..scheduler.config import PlanConfig
from ..scheduler.errors import SchedulerError
from ..scheduler.manager import PartitionManager
from ..scheduler.plan import PartitionPlan
from ..scheduler.profile import ModelProfile
from ..scheduler.workload import Workload
from .events import EventLog
from .metrics import ServerMetrics, TimedHandle

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LearningConfig:
    """calibration: EMA settings. drift_every: reports between two re-plan checks. drift_min_gain: another
    plan must be predicted this much faster than measured (0.25 = 25 %) to propose it. drift_min_samples:
    reports of the running plan needed first. measured_alpha: EMA weight of the running plan's measured
    decode time (what drift is judged on). plan: planner settings for re-plan candidates."""

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    drift_every: int = 5
    drift_min_gain: float = 0.25
    drift_min_samples: int = 5
    measured_alpha: float = 0.3
    plan: PlanConfig = field(default_factory=PlanConfig)

    def __post_init__(self) -> None:
        if self.drift_every < 1 or self.drift_min_samples < 1 or self.drift_min_gain < 0:
            raise ValueError("drift_every and drift_min_samples must be >= 1, drift_min_gain >= 0")
        if not 0 < self.measured_alpha <= 1:
            raise ValueError(f"measured_alpha must be in (0, 1], got {self.measured_alpha}")


@dataclass
class _Running:
    """What the loop knows about one loaded model's plan."""

    plan: PartitionPlan
    profile: ModelProfile | None
    workload: Workload | None
    decision_id: int | None
    samples: int = 0
    measured_ms: float | None = None
    predicted_ms: float | None = None
    pending: ReplanProposal | None = None


class LearningLoop:
    """The hub the server reports measurements to (thread-safe)."""

    def __init__(self, manager: PartitionManager | None = None, metrics: ServerMetrics | None = None,
                 events: EventLog | None = None, config: LearningConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.manager = manager or PartitionManager()
        self.metrics = metrics or ServerMetrics()
        self.events = events or EventLog()
        self.config = config or LearningConfig()
        self.calibrator: Calibrator | None = None
        self._clock = clock
        self._lock = threading.RLock()
        self._running: dict[str, _Running] = {}
        self._autotune: list[dict[str, Any]] = []
        self._replans: list[dict[str, Any]] = []  # applied / dismissed re-plans, for the history endpoint
        self.events.subscribe(lambda ev: self.metrics.observe_event(ev.kind))

    # --- plans ----------------------------------------------------------------------------------------------
    def attach(self, model: str, plan: PartitionPlan | Mapping[str, Any], profile: ModelProfile | None = None,
               cluster: ClusterSpec | None = None, workload: Workload | None = None,
               decision_id: int | None = None, reason: str | None = None) -> None:
        """A model now runs on `plan` (a PartitionPlan or its JSON, extra keys such as node_id/pid ignored).
        With `profile` and `cluster` (the spec it was planned on), reports also calibrate the cost model; with
        the planning `workload` too, the loop also checks for drift (re-plan proposals).
        Records a "plan" event with the plan's reason."""
        p = plan if isinstance(plan, PartitionPlan) else PartitionPlan.from_dict(dict(plan))
        with self._lock:
            if cluster is not None:
                if self.calibrator is None:
                    self.calibrator = Calibrator(cluster, self.config.calibration)
                elif cluster != self.calibrator.base:
                    self.calibrator.set_base(cluster)
            self._running[model] = _Running(p, profile, workload, decision_id)
        layout = "; ".join(f"{list(st.layers)} on " + ",".join(sh.node for sh in st.shards) for st in p.stages)
        self.events.record("plan", f"{model}: {p.strategy} plan {p.plan_id} — {reason or p.reason}", model=model,
                           plan_id=p.plan_id, strategy=p.strategy, layout=layout,
                           predicted=p.predicted.to_dict())

    def attach_loaded(self, model: str, path: str | Path, placement: PartitionPlan | Mapping[str, Any],
                      cluster: Any, dtype: str = "auto", max_seq_len: int | None = None,
                      kv_cache_type: str | None = None) -> None:
        """`attach` for a model the server just loaded on the Ray cluster: the profile from the weights file in
        weight format `dtype` with its KV cache type (runtime.distributed_run.model_profile, as the plan was made),
        the cluster spec from the runtime's (cached) measurements (`cluster`: a runtime ClusterHandle, or already a
        ClusterSpec), and the planning workload as runtime.distributed_run.plan_for_cluster builds it."""
        from ..runtime.distributed_run import default_workload, model_profile

        profile = model_profile(path, dtype, kv_cache_type)
        if isinstance(cluster, ClusterSpec):
            spec = cluster
        else:
            from ..runtime.measure import to_cluster_spec

            spec = to_cluster_spec(cluster.measure())
        # plan_for_cluster's default workload: the same KV budget decides which other plans fit
        self.attach(model, placement, profile, spec, default_workload(profile.context_length, max_seq_len))

    def detach(self, model: str) -> None:
        with self._lock:
            self._running.pop(model, None)

    def running_plan(self, model: str) -> PartitionPlan | None:
        with self._lock:
            r = self._running.get(model)
            return r.plan if r else None

    # --- measurements ----------------------------------------------------------------------------------------
    def track(self, model: str, handle: Any, batch_fn: Callable[[], int] | None = None,
              stages_fn: Callable[[], tuple[float, ...] | None] | None = None) -> TimedHandle:
        """Wrap an engine RequestHandle: token metrics as it streams, `report_chunk` when it ends. `stages_fn`
        gives the executor's measured per-stage decode step times at that moment (RayExecutor.decode_stage_ms)."""

        def on_final(m: str, chunk: Any, batch: float) -> None:
            self.report_chunk(m, chunk, batch, stage_ms=stages_fn() if stages_fn is not None else None)

        return TimedHandle(handle, model, self.metrics, on_final=on_final, batch_fn=batch_fn)

    def report_chunk(self, model: str, chunk: Any, batch: float = 1.0,
                     stage_ms: tuple[float, ...] | None = None) -> None:
        """A request's final GenerationChunk (Ollama's durations) → one report (with the per-stage step times when
        the runtime measured them)."""
        err = getattr(chunk, "error", None)
        n = int(getattr(chunk, "eval_count", 0) or 0)
        dur = int(getattr(chunk, "eval_duration_ns", 0) or 0)
        prompt = int(getattr(chunk, "prompt_eval_count", 0) or 0)
        pre = getattr(chunk, "prompt_eval_duration_ns", 0) or 0
        if err:
            self.report(model, None, success=False, error=str(err))
            return
        if n < 2 or dur <= 0:
            return  # one token carries no decode timing (its time is the prefill's)
        # the engine's eval_duration runs from the end of prefill (which produced token 1) to the last token, so
        # it spans n − 1 decode steps (Ollama divides by n; with few tokens that under-reports the step time)
        running = self.running_plan(model)
        if stage_ms is not None and (running is None or len(stage_ms) != len(running.stages) or min(stage_ms) <= 0):
            stage_ms = None  # measured on another layout (a re-place in between): the total still counts
        timings = StepTimings(dur / (n - 1) / 1e6, stage_ms=stage_ms, prefill_ms=pre / 1e6 if pre else None,
                              batch=max(1, round(batch)), context_tokens=max(1, prompt + n // 2))
        self.report(model, timings)

    def report(self, model: str, timings: StepTimings | None, success: bool = True, error: str | None = None,
               now: float | None = None) -> dict[str, Any] | None:
        """One measurement of `model`'s running plan (timings None with success=False for a failure). Returns
        the calibration history entry when the cost model was calibrated."""
        now = self._clock() if now is None else now
        with self._lock:
            run = self._running.get(model)
            strategy = run.plan.strategy if run else "single"
            wl = (run.workload if run and run.workload else
                  timings.workload(run.profile) if run and run.profile and timings else Workload())
            if not success or timings is None:
                self._record_manager(run, strategy, model, wl, False, now, None, None)
                self.metrics.observe_failure(model)
                self.events.record("failure", f"{model}: {strategy} generation failed: {error or 'unknown error'}",
                                   level="warning", model=model, strategy=strategy,
                                   plan_id=run.plan.plan_id if run else None, error=error)
                return None
            entry = None
            predicted = None
            if run and run.profile is not None and self.calibrator is not None:
                try:
                    entry = self.calibrator.report(run.plan, run.profile, timings, now)
                    predicted = entry["predicted_before_ms"]
                except SchedulerError as exc:
                    log.warning("calibration skipped for %s: %s", model, exc)
            tps = 1e3 * timings.batch / timings.decode_ms_per_token
            self._record_manager(run, strategy, model, wl, True, now, timings.decode_ms_per_token, tps, predicted)
            if run is not None:
                a = self.config.measured_alpha
                run.samples += 1
                run.measured_ms = timings.decode_ms_per_token if run.measured_ms is None else \
                    a * timings.decode_ms_per_token + (1 - a) * run.measured_ms
                run.predicted_ms = entry["predicted_after_ms"] if entry else None
                self.metrics.set_decode_ms(model, run.measured_ms, run.predicted_ms)
                if self.calibrator is not None:
                    for node, f in self.calibrator.node_factors().items():
                        self.metrics.node_factor.labels(node).set(f)
                if run.samples % self.config.drift_every == 0:
                    self._check_drift(model, run, timings)
            return entry

    def _record_manager(self, run: _Running | None, strategy: str, model: str, wl: Workload, success: bool,
                        now: float, measured_ms: float | None, tps: float | None,
                        predicted: float | None = None) -> None:
        try:
            if run is not None and run.decision_id is not None:
                # the plan came from PartitionManager.select: its first outcome completes that history entry
                did, run.decision_id = run.decision_id, None
                self.manager.record_outcome(did, success, now, measured_ms=measured_ms, tokens_per_s=tps)
                return
            self.manager.record(strategy, model, wl.workload_class(), success, now, measured_ms=measured_ms,
                                tokens_per_s=tps, predicted_ms=predicted)
        except SchedulerError as exc:
            log.warning("partition manager rejected a report for %s: %s", model, exc)

    def _check_drift(self, model: str, run: _Running, timings: StepTimings) -> None:
        # without the planning workload we cannot tell which other layouts fit in memory (KV cache for its
        # context × concurrency), so there is no re-plan to propose
        if (run.profile is None or run.workload is None or self.calibrator is None or run.measured_ms is None
                or run.pending is not None):
            return
        try:
            proposal = self.calibrator.replan_check(run.plan, run.profile, run.workload, run.measured_ms,
                                                    run.samples, self.config.plan, self.config.drift_min_gain,
                                                    self.config.drift_min_samples, measured=timings)
        except SchedulerError as exc:
            log.warning("re-plan check for %s failed: %s", model, exc)
            return
        if proposal is None:
            return
        run.pending = proposal
        self.metrics.observe_replan(model, "proposed")
        self.events.record("replan_proposed", f"{model}: {proposal.reason}", level="warning", model=model,
                           current_plan_id=proposal.current_plan_id, plan_id=proposal.plan.plan_id,
                           strategy=proposal.plan.strategy, measured_ms=proposal.measured_ms,
                           predicted_ms=proposal.predicted_ms, plan=proposal.plan.to_dict())

    # --- decisions ------------------------------------------------------------------------------------------
    def pending_replan(self, model: str) -> ReplanProposal | None:
        """The proposed plan for `model`, to apply when it is idle (None when none is pending)."""
        with self._lock:
            r = self._running.get(model)
            return r.pending if r else None

    def replan_applied(self, model: str, plan: PartitionPlan | Mapping[str, Any], cluster: ClusterSpec | None = None,
                       reason: str | None = None, seconds: float | None = None) -> None:
        """The owner switched `model` to `plan` (after a proposal, or on its own, e.g. a node joined): an event,
        a history entry (why, and how long the switch took) and the new plan attached with the old profile."""
        p = plan if isinstance(plan, PartitionPlan) else PartitionPlan.from_dict(dict(plan))
        with self._lock:
            old = self._running.get(model)
            prev = old.plan.plan_id if old else None
            profile, wl = (old.profile, old.workload) if old else (None, None)
            why = reason or (old.pending.reason if old and old.pending else "re-plan")
            self._replans.append({"time": self._clock(), "model": model, "applied": True, "previous_plan_id": prev,
                                  "plan_id": p.plan_id, "strategy": p.strategy, "reason": why,
                                  "seconds": round(seconds, 3) if seconds is not None else None})
            del self._replans[:-100]
        self.metrics.observe_replan(model, "applied")
        self.events.record("replan", f"{model}: re-planned {prev} → {p.strategy} {p.plan_id} ({why})", model=model,
                           previous_plan_id=prev, plan_id=p.plan_id, strategy=p.strategy)
        self.attach(model, p, profile, cluster, wl, reason=f"re-plan applied: {why}")

    def record_recovery(self, model: str, detail: str, node: str | None = None) -> None:
        self.metrics.observe_recovery(model)
        self.events.record("recovery", f"{model}: recovered — {detail}", level="warning", model=model, node=node)

    def propose(self, model: str, plan: PartitionPlan, reason: str, predicted_ms: float = 0.0) -> ReplanProposal:
        """Queue `plan` as `model`'s pending re-plan on the owner's or an operator's request (not from drift):
        it is applied like a drift proposal, when the model is idle. Raises KeyError for a model not running."""
        with self._lock:
            run = self._running.get(model)
            if run is None:
                raise KeyError(f"model {model!r} has no running plan")
            proposal = ReplanProposal(run.plan.plan_id, plan, run.measured_ms or 0.0, predicted_ms, 0.0, reason)
            run.pending = proposal
        self.metrics.observe_replan(model, "proposed")
        self.events.record("replan_proposed", f"{model}: {reason}", level="warning", model=model,
                           current_plan_id=proposal.current_plan_id, plan_id=plan.plan_id, strategy=plan.strategy,
                           plan=plan.to_dict())
        return proposal

    def replan_dismissed(self, model: str, reason: str) -> None:
        """The owner could not apply the pending proposal (e.g. it no longer fits): drop it, say why."""
        with self._lock:
            r = self._running.get(model)
            proposal = r.pending if r else None
            if r is not None:
                r.pending = None
            self._replans.append({"time": self._clock(), "model": model, "applied": False, "reason": reason,
                                  "plan_id": proposal.plan.plan_id if proposal else None})
            del self._replans[:-100]
        self.metrics.observe_replan(model, "dismissed")
        self.events.record("replan_dismissed", f"{model}: {reason}", level="warning", model=model)

    def autotune(self, model: str, trials: Sequence[Trial], warmup: int = 1,
                 seconds: float | None = None) -> AutotuneDecision:
        """Keep the fastest measured candidate (scheduler.calibration.pick_fastest) and record why (`seconds`:
        how long the trials took, the load-time cost of autotuning)."""
        decision = pick_fastest(trials, warmup)
        with self._lock:
            self._autotune.append({"time": self._clock(), "model": model, "plan_id": decision.plan.plan_id,
                                   "strategy": decision.plan.strategy, "measured_ms": dict(decision.measured_ms),
                                   "predicted_ms": {t.plan.plan_id: t.predicted_ms for t in trials},
                                   "strategies": {t.plan.plan_id: t.plan.strategy for t in trials},
                                   "errors": {t.plan.plan_id: t.error for t in trials if t.error},
                                   "seconds": round(seconds, 3) if seconds is not None else None,
                                   "reason": decision.reason})
            del self._autotune[:-100]
        self.events.record("autotune", f"{model}: {decision.reason}", model=model, plan_id=decision.plan.plan_id,
                           measured_ms=dict(decision.measured_ms))
        return decision

    # --- export ---------------------------------------------------------------------------------------------
    def strategies(self) -> dict[str, Any]:
        """GET /api/distributed/strategies: manager metrics and weights, calibration, running plans."""
        mgr = self.manager.to_dict()
        mgr.pop("history", None)
        with self._lock:
            running = {m: {"plan_id": r.plan.plan_id, "strategy": r.plan.strategy, "samples": r.samples,
                           "measured_ms": r.measured_ms, "predicted_ms": r.predicted_ms,
                           "pending_replan": r.pending.reason if r.pending else None}
                       for m, r in self._running.items()}
            cal = self.calibrator.to_dict() if self.calibrator else None
        return {**mgr, "calibration": cal, "running": running, "tokens_per_s": self.metrics.tokens_per_s()}

    def history(self, limit: int = 100) -> dict[str, Any]:
        """GET /api/distributed/history: selections (the partition manager's, predicted vs measured, and the
        re-plans applied or dismissed — entries with "kind": "replan" and why), calibration reports, autotunes."""
        with self._lock:
            cal = self.calibrator.history() if self.calibrator else []
            auto = list(self._autotune)
            replans = [{"kind": "replan", **e} for e in self._replans]
        selections = sorted(self.manager.history() + replans, key=lambda e: e.get("time") or 0.0)
        return {"selections": selections[-limit:], "calibration": cal[-limit:], "autotune": auto[-limit:]}

    def replans(self, limit: int = 100) -> list[dict[str, Any]]:
        """Re-plans applied or dismissed (newest last), as they appear in the history's selections."""
        with self._lock:
            return [{"kind": "replan", **e} for e in self._replans][-limit:]
