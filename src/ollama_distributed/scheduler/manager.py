"""Partition manager (seed §2.1–2.4): registers strategies, selects through the adaptive strategy, learns from
outcomes the runtime reports, and keeps a bounded selection history.

Per strategy, and per (strategy, model, workload class), it tracks executions, successes, failures, success
rate, EMA latency and EMA throughput (EMA_t = α·x_t + (1 − α)·EMA_{t−1}, first value taken as is), the log
ratio measured / predicted that corrects the cost model, and `last_updated` — a time the caller supplies (the
planner reads no clock). Strategy weights are recomputed from these after each outcome:
  w_s ∝ success_rate_s (Laplace-smoothed: (successes + 1) / (executions + 2)) / corrected cost ratio_s,
normalised to sum to 1. All public methods take one lock, so runtime threads may report concurrently.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from .cluster import ClusterSpec
from .config import STRATEGIES, PlanConfig
from .errors import InfeasiblePlanError, SchedulerError
from .plan import PartitionPlan
from .planner import _first_error, cost_model
from .profile import ModelProfile
from .strategies import PartitionStrategy, builtin_strategies
from .strategies.adaptive import AdaptiveConfig, AdaptiveStrategy, ArmEvidence
from .workload import Workload


@dataclass(frozen=True)
class ManagerConfig:
    """enabled: strategies selectable at start (others registered but off). ema_alpha: EMA smoothing in (0, 1].
    history_size: selections kept (oldest dropped). adaptive: exploration settings. plan: planner settings
    (its `strategy` is ignored: the manager chooses). plan_cache_size: candidate plans cached per input."""

    enabled: tuple[str, ...] = STRATEGIES
    ema_alpha: float = 0.2
    history_size: int = 100
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    plan_cache_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")
        if self.history_size < 1 or self.plan_cache_size < 0:
            raise ValueError(f"history_size must be >= 1 and plan_cache_size >= 0, got {self.history_size}, "
                             f"{self.plan_cache_size}")


@dataclass
class StrategyStats:
    """Outcome statistics of one strategy (optionally for one model / workload class)."""

    executions: int = 0
    successes: int = 0
    failures: int = 0
    ema_latency_ms: float | None = None
    ema_tokens_per_s: float | None = None
    log_ratio_sum: float = 0.0
    log_ratio_n: int = 0
    last_updated: float | None = None

    @property
    def success_rate(self) -> float:
        return self.successes / self.executions if self.executions else 0.0

    def update(self, success: bool, latency_ms: float | None, tokens_per_s: float | None, log_ratio: float | None,
               alpha: float, now: float) -> None:
        self.executions += 1
        if success:
            self.successes += 1
        else:
            self.failures += 1
        if latency_ms is not None:
            self.ema_latency_ms = latency_ms if self.ema_latency_ms is None else \
                alpha * latency_ms + (1 - alpha) * self.ema_latency_ms
        if tokens_per_s is not None:
            self.ema_tokens_per_s = tokens_per_s if self.ema_tokens_per_s is None else \
                alpha * tokens_per_s + (1 - alpha) * self.ema_tokens_per_s
        if log_ratio is not None:
            self.log_ratio_sum += log_ratio
            self.log_ratio_n += 1
        self.last_updated = now

    def to_dict(self) -> dict[str, Any]:
        return {"executions": self.executions, "successes": self.successes, "failures": self.failures,
                "success_rate": self.success_rate, "ema_latency_ms": self.ema_latency_ms,
                "ema_tokens_per_s": self.ema_tokens_per_s, "measured_over_predicted": (
                    math.exp(self.log_ratio_sum / self.log_ratio_n) if self.log_ratio_n else None),
                "measurements": self.log_ratio_n, "last_updated": self.last_updated}


@dataclass(frozen=True)
class Selection:
    """What `select` returns: the plan to run and the id to report its outcome under."""

    decision_id: int
    strategy: str
    plan: PartitionPlan
    predicted_ms: float
    reason: str


class PartitionManager:
    """Chooses a strategy per (model, cluster, workload) and learns from measured outcomes."""

    def __init__(self, config: ManagerConfig | None = None) -> None:
        self.config = config or ManagerConfig()
        self._lock = threading.Lock()
        self._strategies: dict[str, PartitionStrategy] = {}
        self._enabled: dict[str, bool] = {}
        self._stats: dict[str, StrategyStats] = {}
        self._class_stats: dict[tuple[str, str, str], StrategyStats] = {}
        self._weights: dict[str, float] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=self.config.history_size)
        self._pending: dict[int, dict[str, Any]] = {}  # decision id -> entry (also for entries dropped from history)
        self._ids = itertools.count(1)
        self._adaptive = AdaptiveStrategy(self.config.adaptive)
        self._cache: OrderedDict[str, dict[str, PartitionPlan | InfeasiblePlanError]] = OrderedDict()
        for name, strat in builtin_strategies().items():
            self.register(strat, enabled=name in self.config.enabled)

    # --- registry ----------------------------------------------------------------------------------------
    def register(self, strategy: PartitionStrategy, enabled: bool = True) -> None:
        with self._lock:
            self._strategies[strategy.name] = strategy
            self._enabled[strategy.name] = enabled
            self._stats.setdefault(strategy.name, StrategyStats())
            self._cache.clear()
            self._recompute_weights()

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._lock:
            if name not in self._strategies:
                raise SchedulerError(f"unknown strategy {name!r}; registered: {', '.join(self._strategies)}")
            self._enabled[name] = enabled

    def enabled(self) -> list[str]:
        with self._lock:
            return [n for n, on in self._enabled.items() if on]

    # --- selection -----------------------------------------------------------------------------------------
    def _candidates(self, profile: ModelProfile, cluster: ClusterSpec, workload: Workload,
                    names: list[str]) -> dict[str, PartitionPlan | InfeasiblePlanError]:
        key = json.dumps([profile.to_dict(), cluster.to_dict(), workload.to_dict(), sorted(names),
                          repr(self.config.plan)], sort_keys=True, default=str)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        cm = cost_model(profile, cluster, workload, self.config.plan)
        out: dict[str, PartitionPlan | InfeasiblePlanError] = {}
        for n in names:
            try:
                out[n] = self._strategies[n].plan(cm, self.config.plan)
            except InfeasiblePlanError as exc:
                out[n] = exc
        if self.config.plan_cache_size:
            self._cache[key] = out
            while len(self._cache) > self.config.plan_cache_size:
                self._cache.popitem(last=False)
        return out

    def _evidence(self, strategy: str, model: str, wclass: str) -> ArmEvidence:
        st = self._class_stats.get((strategy, model, wclass))
        if st is None or not st.log_ratio_n:
            st = self._stats.get(strategy)  # fall back to what this strategy showed elsewhere
        if st is None or not st.log_ratio_n:
            return ArmEvidence()
        return ArmEvidence(st.log_ratio_n, st.log_ratio_sum)

    def select(self, profile: ModelProfile, cluster: ClusterSpec, workload: Workload, now: float) -> Selection:
        """Plan with every enabled strategy, let the adaptive strategy choose, record the decision."""
        with self._lock:
            names = [n for n, on in self._enabled.items() if on]
            if not names:
                raise SchedulerError("every strategy is disabled")
            results = self._candidates(profile, cluster, workload, names)
            plans = {n: p for n, p in results.items() if isinstance(p, PartitionPlan)}
            if not plans:
                raise _first_error(results)
            cm = cost_model(profile, cluster, workload, self.config.plan)
            predicted = {n: cm.cost(p) for n, p in plans.items()}
            wclass = workload.workload_class()
            evidence = {n: self._evidence(n, profile.name, wclass) for n in plans}
            decision = self._adaptive.choose(predicted, evidence)
            chosen = plans[decision.choice]
            infeasible = sorted(n for n, r in results.items() if isinstance(r, InfeasiblePlanError))
            reason = decision.reason + (f"; infeasible: {', '.join(infeasible)}" if infeasible else "")
            did = next(self._ids)
            entry = {"id": did, "time": now, "model": profile.name, "workload_class": wclass,
                     "workload": workload.to_dict(), "nodes": len(cluster.nodes), "objective": cm.objective,
                     "candidates_ms": {n: c * 1e3 for n, c in predicted.items()},
                     "corrected_ms": {n: c * 1e3 for n, c in decision.corrected.items()},
                     "choice": decision.choice, "explored": decision.explored, "plan_id": chosen.plan_id,
                     "predicted_ms": predicted[decision.choice] * 1e3, "measured_ms": None, "success": None,
                     "reason": reason}
            self._history.append(entry)
            self._pending[did] = entry
            while len(self._pending) > 4 * self.config.history_size:  # bound outcomes never reported
                self._pending.pop(next(iter(self._pending)))
            plan = PartitionPlan(chosen.model, chosen.strategy, chosen.stages, chosen.predicted,
                                 f"{reason}. {chosen.reason}", chosen.objective)
            return Selection(did, decision.choice, plan, predicted[decision.choice] * 1e3, reason)

    # --- outcomes -----------------------------------------------------------------------------------------
    def record_outcome(self, decision_id: int, success: bool, now: float, measured_ms: float | None = None,
                       tokens_per_s: float | None = None) -> None:
        """Report how a selection ran: measured_ms is the measured cost comparable to the prediction
        (ms per token under the plan's objective)."""
        with self._lock:
            entry = self._pending.pop(decision_id, None)
            if entry is None:
                raise SchedulerError(f"unknown or already reported decision id {decision_id}")
            entry["measured_ms"] = measured_ms
            entry["success"] = success
            self._update(entry["choice"], entry["model"], entry["workload_class"], success, measured_ms,
                         tokens_per_s, entry["predicted_ms"], now)

    def record(self, strategy: str, model: str, workload_class: str, success: bool, now: float,
               measured_ms: float | None = None, tokens_per_s: float | None = None,
               predicted_ms: float | None = None) -> None:
        """Report an execution that did not come from `select` (e.g. a plan fixed by configuration)."""
        with self._lock:
            if strategy not in self._strategies:
                raise SchedulerError(f"unknown strategy {strategy!r}")
            self._update(strategy, model, workload_class, success, measured_ms, tokens_per_s, predicted_ms, now)

    def _update(self, strategy: str, model: str, wclass: str, success: bool, measured_ms: float | None,
                tokens_per_s: float | None, predicted_ms: float | None, now: float) -> None:
        if measured_ms is not None and measured_ms <= 0:
            raise SchedulerError(f"measured_ms must be > 0, got {measured_ms}")
        ratio = math.log(measured_ms / predicted_ms) if (success and measured_ms and predicted_ms) else None
        a = self.config.ema_alpha
        lat = measured_ms if success else None
        for st in (self._stats.setdefault(strategy, StrategyStats()),
                   self._class_stats.setdefault((strategy, model, wclass), StrategyStats())):
            st.update(success, lat, tokens_per_s if success else None, ratio, a, now)
        self._recompute_weights()

    def _recompute_weights(self) -> None:
        raw = {}
        for n, st in self._stats.items():
            smoothed = (st.successes + 1) / (st.executions + 2)
            ratio = math.exp(st.log_ratio_sum / st.log_ratio_n) if st.log_ratio_n else 1.0
            raw[n] = smoothed / ratio
        total = sum(raw.values()) or 1.0
        self._weights = {n: v / total for n, v in raw.items()}

    # --- export -------------------------------------------------------------------------------------------
    def weights(self) -> dict[str, float]:
        with self._lock:
            return dict(self._weights)

    def stats(self, strategy: str, model: str | None = None, workload_class: str | None = None) -> dict[str, Any]:
        with self._lock:
            if model is None:
                st = self._stats.get(strategy)
            else:
                st = self._class_stats.get((strategy, model, workload_class or ""))
            return (st or StrategyStats()).to_dict()

    def history(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._history]

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "strategies": {n: {"enabled": self._enabled[n], "weight": self._weights.get(n, 0.0),
                                   "stats": self._stats[n].to_dict()} for n in self._strategies},
                "by_class": [{"strategy": s, "model": m, "workload_class": w, **st.to_dict()}
                             for (s, m, w), st in self._class_stats.items()],
                "history": [dict(e) for e in self._history],
                "config": {"ema_alpha": self.config.ema_alpha, "history_size": self.config.history_size,
                           "exploration": self.config.adaptive.exploration},
            }
