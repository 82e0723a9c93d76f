"""Autotune on load (issue 7): run the best-predicted candidate plans for a few real decode steps, keep the fastest.

The cost model ranks plans from probed node speeds and links; on a real cluster its ranking can be wrong (Python
and Ray overhead per stage, a busy neighbour). When a model is loaded with strategy "auto" on a cluster where
more than one layout is feasible, the `k` plans with the lowest predicted decode time
(scheduler/calibration.py `autotune_candidates`) are started one after another; each runs one prefill and
`steps` + 1 single-token decode steps on a synthetic prompt (the first decode step is warm-up and dropped by
`pick_fastest`), and is closed again: shards hold their nodes' memory budget, so two candidates on the same nodes
cannot run side by side. The candidates run worst-predicted first, so the predicted best — the usual winner —
is the last one started and is kept without a second start. The LearningLoop records the decision and its
reason in the selection history (`/api/distributed/history` → "autotune").

Bounded load time: k <= 3 candidates x (one executor start + a few steps); ServerSettings checks the bounds.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

_TRIAL_SEQ = 2**31 - 7  # a sequence id no engine uses (engines count from 1); freed after the trial
_TRIAL_PROMPT = 16


def decode_trial(executor: Any, steps: int) -> tuple[float, ...]:
    """Milliseconds of each of `steps` single-token greedy decode steps after a short prefill (then freed)."""
    vocab = int(executor.config.vocab_size)
    prompt = [1 + (i * 7919) % (vocab - 1) for i in range(_TRIAL_PROMPT)]
    logits = executor.step([_TRIAL_SEQ], [prompt])
    tok = int(logits[-1].argmax())
    out = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = executor.step([_TRIAL_SEQ], [[tok]])
            out.append((time.perf_counter() - t0) * 1e3)
            tok = int(logits[-1].argmax())
    finally:
        executor.free(_TRIAL_SEQ)
    return tuple(out)


def candidates(inputs: Any, k: int, sources: Any | None = None) -> list[Any]:
    """The k best-predicted distinct layouts over every strategy (fewer when fewer are feasible). sources: which
    nodes hold the model's weights (scheduler/load_cost.py WeightSources); each candidate then prefers them among
    layouts within the load tolerance and carries its load costs, as every other plan does (scheduler.plan)."""
    from ..scheduler.calibration import autotune_candidates
    from ..scheduler.config import PlanConfig
    from ..scheduler.load_cost import prefer_holders
    from ..scheduler.planner import plan_candidates

    profile, spec, workload = inputs
    config = PlanConfig(strategy="auto")
    cm, results = plan_candidates(profile, spec, workload, config)
    cands = autotune_candidates(results, k)
    if sources is None:
        return cands
    distinct: dict[Any, Any] = {}
    for p in cands:  # two layouts may become one once both move to the holders
        p = prefer_holders(p, cm, sources, config.load_tolerance)
        distinct.setdefault(p.stages, p)
    return list(distinct.values())


def autotune(name: str, plans: list[Any], build: Callable[[Any], Any], steps: int,
             learning: Any | None = None) -> tuple[Any, Any]:
    """Try each plan of `plans` (at least two) and return (executor on the fastest, AutotuneDecision). `build`
    starts an executor on a plan. Raises scheduler SchedulerError when no candidate ran."""
    from ..scheduler.calibration import Trial, pick_fastest

    t_start = time.perf_counter()
    trials: list[Trial] = []
    last: tuple[Any, Any] | None = None  # (plan, executor) of the last candidate, kept open
    for p in sorted(plans, key=lambda p: (-p.predicted.decode_ms_per_token, p.plan_id)):
        if last is not None:
            last[1].close()
            last = None
        predicted = float(p.predicted.decode_ms_per_token)
        try:
            ex = build(p)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot start is a failed trial
            log.warning("autotune: %s %s did not start: %s", p.strategy, p.plan_id, exc)
            trials.append(Trial(p, predicted, error=f"start failed: {exc}"))
            continue
        try:
            measured = decode_trial(ex, steps + 1)
        except Exception as exc:  # noqa: BLE001 - a failing plan loses the trial
            log.warning("autotune: %s %s failed its trial: %s", p.strategy, p.plan_id, exc)
            trials.append(Trial(p, predicted, error=str(exc)))
            ex.close()
            continue
        log.info("autotune %s: %s %s measured %s ms/token (predicted %.3f)", name, p.strategy, p.plan_id,
                 [round(m, 2) for m in measured], predicted)
        trials.append(Trial(p, predicted, measured))
        last = (p, ex)
    try:
        if learning is not None:
            decision = learning.autotune(name, trials, warmup=1,
                                         seconds=time.perf_counter() - t_start)
        else:
            decision = pick_fastest(trials, warmup=1)
    except BaseException:
        if last is not None:
            last[1].close()
        raise
    if last is not None and last[0].plan_id == decision.plan.plan_id:
        chosen = last[1]
    else:
        if last is not None:
            last[1].close()
        chosen = build(decision.plan)
    log.info("autotune %s: %s (%.1f s)", name, decision.reason, time.perf_counter() - t_start)
    return chosen, decision
