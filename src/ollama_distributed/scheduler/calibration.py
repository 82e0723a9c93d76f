"""Calibrating the cost model from what the runtime measured, and the decisions that follow from it.

The cost model (cost.py) predicts from declared or probed node speeds and link parameters; real runs differ
(thermal throttling, a busy neighbour, kernels slower than the roofline). The runtime reports measured decode
times of a running plan; this module keeps, per node and per link pair, a slowdown factor
    f = measured time / time predicted from the *base* cluster
smoothed as an EMA in log space (a geometric mean, so 2× slower and 2× faster weigh the same):
    log f_t = (1 − α) · log f_{t−1} + α · log r_t,      f_0 = 1 (trust the base spec until told otherwise).
The calibrated ClusterSpec divides a node's memory bandwidth and FLOP/s by f (both, so that the roofline
max(q/β, w/π) of every kernel scales by exactly f) and multiplies a link's latency by f and divides its
bandwidth by f (the alpha-beta hop time scales by f). Hence a stage predicted at T on the base cluster is
predicted at f·T after calibration, and as f converges to the measured ratio the predicted decode time converges
to the measured one.

Attribution of one report (decode step of a plan with stages 1..k):
  * per-stage times given: stage i's ratio r_i = measured_i / predicted_i goes to every node of the stage and to
    the links inside it (its all-reduces are part of the stage time); the remainder, total − Σ stages, is the
    network between stages: its ratio goes to the links between consecutive stage representatives and the
    return link;
  * only the total given: one ratio for every node and link the plan uses.
Fixed overhead (StepOverhead: per step and per stage; cost.py) is calibrated separately, before the factors:
each report adds a point (predicted compute + network on the base cluster, stages, measured) to a window, and
scheduler/overhead.py fits measured = a·compute + o_step + k·o_stage + b·o_seq over it where the data identify it
(the base
cluster's overhead — the runtime's measured default — elsewhere). The factors then learn from the measured time
minus that overhead, folded with weight α·share, share = (measured − overhead) / measured: a step that is almost
all overhead says little about a node's speed (on a tiny model the factors otherwise absorb the overhead: ×4 and
more). With zero overhead this is exactly the scheme above.
Pure: no clocks (callers pass `now`), no I/O; a lock keeps concurrent reports consistent.

Decisions built on it (issue 7, "Learning loop"):
  * `pick_fastest`: autotune on load — candidate plans each ran a few decode steps; keep the fastest measured.
  * `propose_replan`: the running plan's measured time drifted well above another plan's (calibrated) prediction.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .cluster import ClusterSpec, LinkSpec, StepOverhead, _pair
from .config import PlanConfig
from .cost import CostModel
from .errors import InfeasiblePlanError, SchedulerError
from .overhead import OverheadFit, OverheadPoint, fit_overhead
from .plan import PartitionPlan, Prediction
from .planner import plan_candidates
from .profile import ModelProfile
from .workload import Workload


@dataclass(frozen=True)
class CalibrationConfig:
    """alpha: EMA weight of a new measurement in (0, 1]. min_factor/max_factor: sanity clamp of one ratio (a
    broken timer must not make a node look infinitely slow). The range is wide on purpose: the roofline has no
    fixed per-step term, so on a tiny model the Python/launch overhead alone can be 100-1000× the predicted
    compute, and the factor has to absorb it. history_size: reports kept (oldest dropped).
    fit_overhead: learn the StepOverhead from the reports (scheduler/overhead.py); False keeps the base
    cluster's. overhead_window: reports the fit uses (the most recent). overhead_min_reports: reports needed
    before the first fit."""

    alpha: float = 0.3
    min_factor: float = 1e-3
    max_factor: float = 1e4
    history_size: int = 200
    fit_overhead: bool = True
    overhead_window: int = 50
    overhead_min_reports: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 < self.min_factor <= 1.0 <= self.max_factor:
            raise ValueError(f"need 0 < min_factor <= 1 <= max_factor, got {self.min_factor}, {self.max_factor}")
        if self.history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {self.history_size}")
        if self.overhead_window < 1 or self.overhead_min_reports < 1:
            raise ValueError(f"overhead_window and overhead_min_reports must be >= 1, got "
                             f"{self.overhead_window}, {self.overhead_min_reports}")


@dataclass(frozen=True)
class StepTimings:
    """One measurement of a running plan (decode, steady state).

    decode_ms_per_token: measured time between two tokens of one sequence.
    stage_ms: per-stage time of one decode step (stage order, each including its tensor-parallel all-reduces),
      or None when the runtime only knows the total.
    prefill_ms: measured prefill of the request (recorded, not used for calibration).
    batch: sequences decoded together in the measured steps. context_tokens: mean context they attended to."""

    decode_ms_per_token: float
    stage_ms: tuple[float, ...] | None = None
    prefill_ms: float | None = None
    batch: int = 1
    context_tokens: int = 64

    def __post_init__(self) -> None:
        if not (self.decode_ms_per_token > 0 and math.isfinite(self.decode_ms_per_token)):
            raise ValueError(f"decode_ms_per_token must be a positive number, got {self.decode_ms_per_token}")
        if self.stage_ms is not None:
            object.__setattr__(self, "stage_ms", tuple(float(x) for x in self.stage_ms))
            if any(not (x > 0 and math.isfinite(x)) for x in self.stage_ms):
                raise ValueError(f"stage_ms must all be positive numbers, got {list(self.stage_ms)}")
        if self.batch < 1 or self.context_tokens < 1:
            raise ValueError(f"batch and context_tokens must be >= 1, got {self.batch}, {self.context_tokens}")

    def workload(self, profile: ModelProfile) -> Workload:
        """The workload whose decode step these timings measured (mean decode context = context_tokens)."""
        ctx = max(1, min(self.context_tokens, profile.context_length - 1))
        return Workload(prompt_tokens=ctx, output_tokens=1, context_tokens=ctx + 1, concurrency=self.batch)


def _decode_parts(cm: CostModel, plan: PartitionPlan) -> tuple[list[float], float]:
    """Predicted decode seconds per stage and of the network between stages (hops + return), latency form."""
    stages = plan.stages
    k = len(stages)
    dec = [cm.stage_times(st, i == k - 1)[0] for i, st in enumerate(stages)]
    reps = [st.shards[0].node for st in stages]
    net = sum(cm.hop(reps[i], reps[i + 1]) for i in range(k - 1))
    net += cm.return_hop(reps[-1], reps[0]) if k > 1 else 0.0
    return dec, net


def _stage_links(plan: PartitionPlan) -> tuple[list[list[tuple[str, str]]], list[tuple[str, str]]]:
    """Links inside each stage (TP pairs) and links between stages (consecutive reps + the return)."""
    inner = [[_pair(a.node, b.node) for i, a in enumerate(st.shards) for b in st.shards[i + 1:]]
             for st in plan.stages]
    reps = [st.shards[0].node for st in plan.stages]
    between = [_pair(reps[i], reps[i + 1]) for i in range(len(reps) - 1) if reps[i] != reps[i + 1]]
    if len(reps) > 1 and reps[-1] != reps[0]:
        between.append(_pair(reps[-1], reps[0]))
    return inner, between


class Calibrator:
    """Per-node and per-link slowdown factors learnt from measured decode times, over a base ClusterSpec."""

    def __init__(self, base: ClusterSpec, config: CalibrationConfig | None = None) -> None:
        self.config = config or CalibrationConfig()
        self._lock = threading.Lock()
        self._base = base
        self._node_log: dict[str, float] = {}
        self._link_log: dict[tuple[str, str], float] = {}
        self._node_n: dict[str, int] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=self.config.history_size)
        self._reports = 0
        self._points: deque[OverheadPoint] = deque(maxlen=self.config.overhead_window)
        self._window: deque[tuple[PartitionPlan, ModelProfile, StepTimings]] = deque(maxlen=self.config.overhead_window)
        self._fit = OverheadFit(base.overhead, 1.0, (), 0.0)

    # --- state -------------------------------------------------------------------------------------------
    @property
    def base(self) -> ClusterSpec:
        return self._base

    def set_base(self, base: ClusterSpec) -> None:
        """New declared/probed values (e.g. the runtime re-measured): factors of nodes that still exist stay."""
        with self._lock:
            names = set(base.names)
            self._base = base
            # the points' compute times were predicted on the old base: start the overhead fit afresh
            self._points.clear()
            self._window.clear()
            self._fit = OverheadFit(base.overhead, 1.0, (), 0.0)
            self._node_log = {n: v for n, v in self._node_log.items() if n in names}
            self._link_log = {p: v for p, v in self._link_log.items() if p[0] in names and p[1] in names}

    def node_factors(self) -> dict[str, float]:
        with self._lock:
            return {n: math.exp(self._node_log.get(n, 0.0)) for n in self._base.names}

    def link_factors(self) -> dict[str, float]:
        with self._lock:
            return {f"{a}-{b}": math.exp(v) for (a, b), v in self._link_log.items()}

    def overhead(self) -> StepOverhead:
        """The calibrated per-step / per-stage overhead (the base cluster's until the reports identify it)."""
        with self._lock:
            return self._fit.overhead

    def cluster(self) -> ClusterSpec:
        """The base cluster with every learnt factor applied (see module docstring)."""
        with self._lock:
            return self._calibrated()

    def _calibrated(self) -> ClusterSpec:
        base = self._base
        nodes = []
        for n in base.nodes:
            f = math.exp(self._node_log.get(n.name, 0.0))
            nodes.append(replace(n, memory_bandwidth=n.memory_bandwidth / f, flops=n.flops / f))
        links = dict(base.link_overrides)
        for (a, b), lf in self._link_log.items():
            link = base.link(a, b)
            f = math.exp(lf)
            links[(a, b)] = LinkSpec(link.latency * f, link.bandwidth / f)
        return ClusterSpec(tuple(nodes), base.default_link, links, self._fit.overhead)

    # --- predictions -------------------------------------------------------------------------------------
    def predict(self, plan: PartitionPlan, profile: ModelProfile, workload: Workload,
                objective: str | None = None) -> Prediction:
        """The plan's prediction on the calibrated cluster (objective: the plan's own by default)."""
        with self._lock:
            cm = CostModel(profile, self._calibrated(), workload, objective or plan.objective)
        return cm.evaluate(plan.stages)[0]

    def predicted_decode_ms(self, plan: PartitionPlan, profile: ModelProfile, timings: StepTimings) -> float:
        """Predicted time between two tokens of one sequence under the conditions `timings` measured."""
        return self.predict(plan, profile, timings.workload(profile), "latency").decode_ms_per_token

    # --- learning ----------------------------------------------------------------------------------------
    def report(self, plan: PartitionPlan, profile: ModelProfile, timings: StepTimings,
               now: float | None = None) -> dict[str, Any]:
        """Fold one measurement into the factors; returns (and keeps) the history entry with the prediction
        before and after. Raises SchedulerError when the plan names nodes the cluster lacks, or stage_ms does
        not have one entry per stage."""
        unknown = [n for n in plan.nodes if n not in set(self._base.names)]
        if unknown:
            raise SchedulerError(f"plan {plan.plan_id} uses node(s) {unknown} not in the calibrated cluster "
                                 f"({', '.join(self._base.names)})")
        if timings.stage_ms is not None and len(timings.stage_ms) != len(plan.stages):
            raise SchedulerError(f"stage_ms has {len(timings.stage_ms)} entries for a plan of "
                                 f"{len(plan.stages)} stage(s)")
        wl = timings.workload(profile)
        with self._lock:
            base_cm = CostModel(profile, self._base, wl, "latency")
            before = CostModel(profile, self._calibrated(), wl, "latency").evaluate(plan.stages)[0]
            dec, net = _decode_parts(base_cm, plan)
            measured_s = timings.decode_ms_per_token / 1e3
            k = len(plan.stages)
            self._points.append(OverheadPoint(sum(dec) + net, k, measured_s, timings.batch))
            self._window.append((plan, profile, timings))
            old = self._fit
            if self.config.fit_overhead:
                self._fit = fit_overhead(list(self._points), self._base.overhead, self.config.overhead_min_reports)
            if self._fit.fitted != old.fitted or _moved(old.overhead, self._fit.overhead, k, timings.batch):
                # The factors learnt so far subtracted another overhead: learn them again from the reports in the
                # window (oldest first) with this one, so an early guess does not linger in the EMA.
                self._node_log.clear()
                self._link_log.clear()
                for p_, prof_, t_ in list(self._window)[:-1]:
                    cm_ = CostModel(prof_, self._base, t_.workload(prof_), "latency")
                    self._fold(p_, t_, *_decode_parts(cm_, p_))
            ratios = self._fold(plan, timings, dec, net)
            after = CostModel(profile, self._calibrated(), wl, "latency").evaluate(plan.stages)[0]
            self._reports += 1
            entry = {"report": self._reports, "time": now, "model": profile.name, "plan_id": plan.plan_id,
                     "strategy": plan.strategy, "measured_ms": timings.decode_ms_per_token,
                     "stage_ms": list(timings.stage_ms) if timings.stage_ms is not None else None,
                     "prefill_ms": timings.prefill_ms, "batch": timings.batch,
                     "predicted_base_ms": (sum(dec) + net + self._base.overhead.total(k, timings.batch)) * 1e3,
                     "predicted_before_ms": before.decode_ms_per_token,
                     "predicted_after_ms": after.decode_ms_per_token, "ratios": ratios,
                     "overhead": self._overhead_dict()}
            self._history.append(entry)
            return dict(entry)

    def _fold(self, plan: PartitionPlan, timings: StepTimings, dec: list[float], net: float) -> dict[str, float]:
        """Fold one report's ratios (measured minus the current overhead, over the base prediction) into the
        node and link factors; returns the ratios."""
        inner, between = _stage_links(plan)
        measured_s = timings.decode_ms_per_token / 1e3
        k = len(plan.stages)
        o = self._fit.overhead
        floor = self.config.min_factor
        ratios: dict[str, float] = {}
        if timings.stage_ms is not None:
            for i, st in enumerate(plan.stages):
                stage_s = timings.stage_ms[i] / 1e3
                work = stage_s - o.stage_s
                r = self._clamp(max(work, dec[i] * floor) / dec[i])
                w = max(0.0, work) / stage_s
                ratios[f"stage{i}"] = r
                for sh in st.shards:
                    self._fold_node(sh.node, r, w)
                for pair in inner[i]:
                    self._fold_link(pair, r, w)
            if between and net > 0:
                # floor: a network faster than measurable still counts as (almost) free, not negative
                residual = max(measured_s - sum(timings.stage_ms) / 1e3 - o.step_s - timings.batch * o.seq_s,
                               net * floor)
                r = self._clamp(residual / net)
                ratios["network"] = r
                for pair in between:
                    self._fold_link(pair, r)
        else:
            work = measured_s - o.total(k, timings.batch)
            r = self._clamp(max(work, (sum(dec) + net) * floor) / (sum(dec) + net))
            w = max(0.0, work) / measured_s
            ratios["plan"] = r
            for n in plan.nodes:
                self._fold_node(n, r, w)
            for pair in [p for ps in inner for p in ps] + between:
                self._fold_link(pair, r, w)
        return ratios

    def _clamp(self, r: float) -> float:
        return min(self.config.max_factor, max(self.config.min_factor, r))

    def _fold_node(self, node: str, r: float, weight: float = 1.0) -> None:
        a = self.config.alpha * weight
        self._node_log[node] = (1 - a) * self._node_log.get(node, 0.0) + a * math.log(r)
        self._node_n[node] = self._node_n.get(node, 0) + 1

    def _fold_link(self, pair: tuple[str, str], r: float, weight: float = 1.0) -> None:
        a = self.config.alpha * weight
        self._link_log[pair] = (1 - a) * self._link_log.get(pair, 0.0) + a * math.log(r)

    def _overhead_dict(self) -> dict[str, Any]:
        f = self._fit
        return {"step_ms": f.overhead.step_s * 1e3, "stage_ms": f.overhead.stage_s * 1e3,
                "seq_ms": f.overhead.seq_s * 1e3, "fitted": list(f.fitted),
                "scale": f.scale, "rms_ms": f.rms_s * 1e3, "points": len(self._points)}

    # --- export -------------------------------------------------------------------------------------------
    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._history]

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            cal = self._calibrated()
            return {
                "reports": self._reports, "alpha": self.config.alpha,
                "nodes": {n.name: {"factor": math.exp(self._node_log.get(n.name, 0.0)),
                                   "reports": self._node_n.get(n.name, 0),
                                   "declared_memory_bandwidth": b.memory_bandwidth, "declared_flops": b.flops,
                                   "memory_bandwidth": n.memory_bandwidth, "flops": n.flops}
                          for n, b in zip(cal.nodes, self._base.nodes)},
                "links": {f"{a}-{b}": {"factor": math.exp(v), "latency": cal.link(a, b).latency,
                                       "bandwidth": cal.link(a, b).bandwidth}
                          for (a, b), v in self._link_log.items()},
                "overhead": self._overhead_dict(),
            }

    def replan_check(self, current: PartitionPlan, profile: ModelProfile, workload: Workload, measured_ms: float,
                     samples: int, config: PlanConfig | None = None, min_gain: float = 0.25,
                     min_samples: int = 5, measured: StepTimings | None = None) -> "ReplanProposal | None":
        """Plan every enabled strategy on the calibrated cluster for the planning `workload` (which decides what
        fits in memory: KV cache for its context × concurrency) and ask `propose_replan` whether one of them is
        predicted well below the running plan. Predictions are compared under the conditions the measurements
        were taken in (`measured`: batch and context; default the planning workload), the running plan's
        included, so an unconverged calibration cannot make every other plan look faster."""
        config = config or PlanConfig()
        cal = self.cluster()
        _, results = plan_candidates(profile, cal, workload, config)
        cond = measured.workload(profile) if measured is not None else workload
        cm = CostModel(profile, cal, cond, "latency")
        alts = [(p, cm.evaluate(p.stages)[0].decode_ms_per_token) for p in results.values()
                if isinstance(p, PartitionPlan)]
        unknown = [n for n in current.nodes if n not in set(cal.names)]
        cur = None if unknown else cm.evaluate(current.stages)[0].decode_ms_per_token
        return propose_replan(current, measured_ms, samples, alts, min_gain=min_gain, min_samples=min_samples,
                              current_predicted_ms=cur)


def _moved(a: StepOverhead, b: StepOverhead, stages: int, batch: int, rel: float = 0.25) -> bool:
    """The overhead of a step like the current one changed by more than `rel` (relative)."""
    x, y = a.total(stages, batch), b.total(stages, batch)
    return abs(x - y) > rel * max(x, y, 1e-12)


# --- decisions ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """A candidate plan tried for a few decode steps on load: predicted and measured ms per token (one value
    per step, warm-up included), or the error that stopped it."""

    plan: PartitionPlan
    predicted_ms: float
    measured_ms: tuple[float, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class AutotuneDecision:
    plan: PartitionPlan
    measured_ms: Mapping[str, float]  # plan_id -> median measured ms per token (successful trials)
    reason: str


def pick_fastest(trials: Sequence[Trial], warmup: int = 1) -> AutotuneDecision:
    """Keep the candidate with the lowest median measured decode time (first `warmup` steps of each dropped:
    they pay one-time costs such as allocator growth). Raises SchedulerError when no trial succeeded."""
    scored: dict[str, tuple[float, Trial]] = {}
    failed: list[str] = []
    for t in trials:
        steps = list(t.measured_ms[warmup:]) or list(t.measured_ms)
        if t.error is not None or not steps:
            failed.append(f"{t.plan.strategy} {t.plan.plan_id} ({t.error or 'no measurements'})")
            continue
        scored[t.plan.plan_id] = (statistics.median(steps), t)
    if not scored:
        raise SchedulerError("autotune: no candidate plan ran successfully: " + "; ".join(failed))
    order = sorted(scored, key=lambda pid: (scored[pid][0], pid))
    best_ms, best = scored[order[0]]
    parts = [f"autotune: measured {best.plan.strategy} {best.plan.plan_id} {best_ms:.3f} ms/token "
             f"(predicted {best.predicted_ms:.3f}), fastest of {len(trials)} candidate(s)"]
    others = [f"{scored[p][1].plan.strategy} {p} {scored[p][0]:.3f} ms (predicted {scored[p][1].predicted_ms:.3f})"
              for p in order[1:]]
    if others:
        parts.append("others: " + ", ".join(others))
    if failed:
        parts.append("failed: " + ", ".join(failed))
    if min(scored.values(), key=lambda v: v[1].predicted_ms)[1] is not best:
        parts.append("measurement overrode the cost model's ranking")
    return AutotuneDecision(best.plan, {p: v[0] for p, v in scored.items()}, "; ".join(parts))


def autotune_candidates(results: Mapping[str, PartitionPlan | InfeasiblePlanError], k: int = 3) -> list[PartitionPlan]:
    """The k plans with the lowest predicted decode time, one per distinct layout (two strategies may find
    the same layout: a 1-stage pipeline is the single plan)."""
    seen: dict[str, PartitionPlan] = {}
    for p in results.values():
        if isinstance(p, PartitionPlan) and p.plan_id not in seen:
            seen[p.plan_id] = p
    ranked = sorted(seen.values(), key=lambda p: (p.predicted.decode_ms_per_token, p.plan_id))
    return ranked[:max(1, k)]


@dataclass(frozen=True)
class ReplanProposal:
    current_plan_id: str
    plan: PartitionPlan
    measured_ms: float
    predicted_ms: float
    gain: float  # running plan's measured / proposed plan's predicted − 1
    reason: str


def propose_replan(current: PartitionPlan, measured_ms: float, samples: int,
                   alternatives: Sequence[tuple[PartitionPlan, float]], min_gain: float = 0.25,
                   min_samples: int = 5, current_predicted_ms: float | None = None) -> ReplanProposal | None:
    """Propose the best other layout when the running plan's measured ms/token exceeds that layout's
    predicted ms/token by more than `min_gain` (0.25: measured is over 1.25× the other's prediction), after
    at least `min_samples` measurements (hysteresis: one slow request is not drift). With
    `current_predicted_ms` (the running plan on the same calibrated cluster) the calibrated cost model must
    agree: current prediction also above (1 + min_gain)× the other's, so a gap that calibration has not yet
    explained (it applies to every plan alike) proposes nothing. None otherwise."""
    if min_gain < 0 or min_samples < 1:
        raise ValueError(f"min_gain must be >= 0 and min_samples >= 1, got {min_gain}, {min_samples}")
    if samples < min_samples or not alternatives:
        return None
    others = [(p, ms) for p, ms in alternatives if p.plan_id != current.plan_id and ms > 0]
    if not others:
        return None
    best, best_ms = min(others, key=lambda t: (t[1], t[0].plan_id))
    gain = measured_ms / best_ms - 1.0
    if gain <= min_gain:
        return None
    if current_predicted_ms is not None and current_predicted_ms <= (1.0 + min_gain) * best_ms:
        return None
    reason = (f"drift: running {current.strategy} {current.plan_id} measures {measured_ms:.3f} ms/token over "
              f"{samples} samples"
              + (f" (calibrated prediction {current_predicted_ms:.3f})" if current_predicted_ms is not None else "")
              + f"; {best.strategy} {best.plan_id} is predicted {best_ms:.3f} ms/token on the calibrated cluster "
              f"(measured is {gain * 100:.0f}% above that, threshold {min_gain * 100:.0f}%)")
    return ReplanProposal(current.plan_id, best, measured_ms, best_ms, gain, reason)
