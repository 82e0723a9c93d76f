"""Routing requests over replicas of one model: least outstanding work, weighted by measured speed (issue 6).

A replica is anything with the engine's `submit(GenerationRequest) -> RequestHandle` (an `InferenceEngine`, each
over its own executor / plan). The router sends each request to the replica that would finish it soonest:

    score(r) = (outstanding_work(r) + work(request)) / speed(r)

outstanding_work: the work of the replica's live requests in decode-token equivalents — generation tokens still to
  produce (num_predict − generated; `default_predict` when unbounded) plus prompt tokens still to prefill, the
  latter weighted by `prefill_weight` (a prefilled token costs a fraction of a decoded one: it shares a GEMM).
speed: the replica's measured throughput in tokens/s, an exponential moving average (`alpha`) of tokens emitted
  per second of busy time, a sample once at least `sample_s` of it has passed: idle gaps between requests are left
  out of the window but do not end it, so a replica whose requests each finish within `sample_s` is still measured
  after a few of them. A replica not measured yet is
  assumed as fast as the mean of the measured ones (1 token/s when none is), and wins a tie, so new replicas
  get traffic.
This is "least outstanding requests" load balancing (Envoy's LEAST_REQUEST, NGINX's least_conn) with the request
count replaced by token work and divided by speed, so a replica half as fast gets about half the share.

Progress is observed on the producer side: the router wraps each returned handle's `_push` (the engine's way of
delivering a chunk), so counts move as tokens are generated, not as the client reads them.

The replica set can change while requests run (`add` a replica placed on a node that joined, `remove` one whose
shards could not be re-placed): a removed replica gets no new requests and finishes (or fails) the ones it has.

A caller that must set per-sequence state on the serving replica's executor between `submit` and that replica's
first step does it under `with router.locked_submission():` — the router then takes
the chosen replica's executor lock (`lock_of`) before submitting and keeps it until the block ends, and
`held_replica()` names the replica (service/replicas.py RoutedExecutors builds on this).

Test hook: `SlowedExecutor(inner, delay_s)` wraps an executor and sleeps `delay_s` before every step — only for
tests and benchmarks that need one deliberately slow replica or node (the server applies it only when the
documented test setting `OLLAMA_DISTRIBUTED_TEST_SLOW_NODES` names a node; service/settings.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """alpha: EMA weight of a new speed sample (0 < alpha <= 1). sample_s: shortest interval a sample spans.
    prefill_weight: cost of one prompt token relative to one generated token. default_predict: generation work
    assumed for a request with unbounded num_predict (< 0)."""

    alpha: float = 0.3
    sample_s: float = 0.2
    prefill_weight: float = 0.1
    default_predict: int = 128

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"RouterConfig.alpha must be in (0, 1], got {self.alpha}")
        if self.sample_s <= 0 or self.prefill_weight < 0 or self.default_predict < 1:
            raise ValueError(f"RouterConfig: sample_s ({self.sample_s}) must be > 0, prefill_weight "
                             f"({self.prefill_weight}) >= 0, default_predict ({self.default_predict}) >= 1")


@dataclass
class _Live:
    prompt_left: int
    predict_left: float


@dataclass
class ReplicaState:
    """Router-side view of one replica (read with the router's lock held)."""

    index: int
    engine: Any
    executor: Any = None  # the replica's executor (LiveExecutor in the server); None when unknown
    live: dict[int, _Live] = field(default_factory=dict)
    ema_tps: float | None = None
    served: int = 0  # requests routed here
    tokens: int = 0  # tokens it emitted
    _window_tokens: int = 0
    _window_start: float | None = None  # when the current busy stretch began; None while idle
    _window_busy: float = 0.0  # busy seconds of the window before the current stretch

    def outstanding(self, prefill_weight: float) -> float:
        return sum(r.predict_left + prefill_weight * r.prompt_left for r in self.live.values())


class ReplicaRouter:
    """Sends each request to the replica that would finish it soonest (see module docstring).

    replicas: engines (anything with submit/stats/context_limit/config/close). executors: each replica's executor
    (optional; `held_replica().executor` is how a caller reaches the serving replica's executor). lock_of: the
    lock to hold around a locked submission on a replica (default: its executor's `lock`)."""

    def __init__(self, replicas: Sequence[Any], config: RouterConfig = RouterConfig(),
                 clock: Callable[[], float] = time.perf_counter, executors: Sequence[Any] | None = None,
                 lock_of: Callable[[ReplicaState], Any] | None = None) -> None:
        if not replicas:
            raise ValueError("ReplicaRouter needs at least one replica")
        if executors is not None and len(executors) != len(replicas):
            raise ValueError(f"{len(replicas)} replicas but {len(executors)} executors")
        self.router_config = config
        self._clock = clock
        self._lock = threading.Lock()
        exs = list(executors) if executors is not None else [None] * len(replicas)
        self.replicas = [ReplicaState(i, e, x) for i, (e, x) in enumerate(zip(replicas, exs))]
        self._next_index = len(self.replicas)
        self._ids = 0
        self._lock_of = lock_of or (lambda rep: rep.executor.lock)
        self._local = threading.local()

    # ---- the replica set ----------------------------------------------------------------------------------------
    def add(self, engine: Any, executor: Any = None) -> ReplicaState:
        """Route to one more replica from now on (e.g. one placed on a node that joined)."""
        with self._lock:
            rep = ReplicaState(self._next_index, engine, executor)
            self._next_index += 1
            self.replicas = [*self.replicas, rep]
        log.info("replica %d added (%d now)", rep.index, len(self.replicas))
        return rep

    def remove(self, engine: Any) -> ReplicaState | None:
        """Stop routing to the replica running `engine` (its live requests finish where they are). The last
        replica cannot be removed (ValueError). Returns the removed state, None when it was not routed to."""
        with self._lock:
            keep = [r for r in self.replicas if r.engine is not engine]
            if len(keep) == len(self.replicas):
                return None
            if not keep:
                raise ValueError("cannot remove the last replica")
            gone = next(r for r in self.replicas if r.engine is engine)
            self.replicas = keep
        log.warning("replica %d removed (%d left)", gone.index, len(keep))
        return gone

    # ---- engine-like surface ------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The model's configuration (every replica runs the same model)."""
        return self.replicas[0].engine.config

    @property
    def context_limit(self) -> int:
        return min(int(r.engine.context_limit) for r in self.replicas)

    @contextlib.contextmanager
    def locked_submission(self) -> Iterator[None]:
        """Within this block, `submit` holds the chosen replica's lock (`lock_of`) until the block ends, and
        `held_replica()` names that replica: the caller registers per-sequence state on its executor before the
        replica's engine can step the new sequence."""
        if getattr(self._local, "active", False):
            raise RuntimeError("locked_submission blocks do not nest")
        self._local.active, self._local.held = True, None
        try:
            yield
        finally:
            held = self._local.held
            self._local.active, self._local.held = False, None
            if held is not None:
                held[1].release()

    def held_replica(self) -> ReplicaState:
        """The replica the current `locked_submission` block submitted to (RuntimeError outside one)."""
        held = getattr(self._local, "held", None)
        if held is None:
            raise RuntimeError("no request was submitted in this thread's locked_submission block")
        return held[0]

    def submit(self, request: Any) -> Any:
        """Route `request` and submit it; the replica's QueueFullError passes through only when every replica
        is full (a full replica is skipped)."""
        work = self._work(request)
        order = self._ranked(work)
        locked = getattr(self._local, "active", False)
        last_exc: Exception | None = None
        for rep in order:
            lock = self._lock_of(rep) if locked else None
            if lock is not None:
                lock.acquire()
            try:
                handle = rep.engine.submit(request)
            except Exception as exc:  # noqa: BLE001 - QueueFullError & co: try the next best replica
                if lock is not None:
                    lock.release()
                if type(exc).__name__ != "QueueFullError":
                    raise
                last_exc = exc
                continue
            if lock is not None:
                self._local.held = (rep, lock)
            self._track(rep, handle, request, work)
            return handle
        assert last_exc is not None
        raise last_exc

    def adopt(self, seqs: Sequence[Any], source: Any) -> bool:
        """Move the sequences of a replica that failed for good (its engine's `hand_off`, runtime/engine.py) to
        the routed replica, other than `source` (that replica's engine), that would finish them soonest; their
        chunks then count against it. False when no other replica took them."""
        prompt = sum(len(s.tokens) for s in seqs)  # each is replayed from position 0
        left = sum(self._work(s.request)[1] - s.n_generated for s in seqs)
        for rep in self._ranked((prompt, max(0.0, left))):
            if rep.engine is source:
                continue
            try:
                rep.engine.adopt(seqs)
            except Exception as exc:  # noqa: BLE001 - closed meanwhile: try the next one
                log.warning("replica %d could not adopt %d sequence(s): %s", rep.index, len(seqs), exc)
                continue
            for seq in seqs:
                self._track(rep, seq.handle, seq.request,
                            (len(seq.tokens), max(0.0, self._work(seq.request)[1] - seq.n_generated)))
            log.warning("replica %d adopted %d sequence(s) of a failed replica", rep.index, len(seqs))
            return True
        return False

    def embedding(self, inp: Any, **kwargs: Any) -> Any:
        """Embed on the replica with the least outstanding work (embeddings are one prefill-like step)."""
        return self._ranked((len(inp) if not isinstance(inp, str) else 1, 0.0))[0].engine.embedding(inp, **kwargs)

    def stats(self) -> dict[str, Any]:
        """Summed engine counters (waiting, running, steps) and, per replica, the router's view plus the
        replica's own engine counters."""
        with self._lock:
            reps = list(self.replicas)
            view = [{"index": r.index, "outstanding": round(r.outstanding(self.router_config.prefill_weight), 1),
                     "live": len(r.live), "ema_tokens_per_s": r.ema_tps, "served": r.served, "tokens": r.tokens}
                    for r in reps]
        totals = {"waiting": 0, "running": 0, "steps": 0}
        for r, v in zip(reps, view):
            try:
                es = dict(r.engine.stats())
            except Exception as exc:  # noqa: BLE001 - a closed replica engine still shows its routing counters
                log.debug("stats of replica %d: %s", r.index, exc)
                es = {}
            v["engine"] = es
            for k in totals:
                totals[k] += int(es.get(k, 0))
        return {**totals, "replicas": view}

    def close(self) -> None:
        for r in self.replicas:
            r.engine.close()

    # ---- internals ----------------------------------------------------------------------------------------------
    def _work(self, request: Any) -> tuple[int, float]:
        n = int(getattr(request.options, "num_predict", -1))
        return len(request.prompt_ids), float(n if n >= 0 else self.router_config.default_predict)

    def _ranked(self, work: tuple[int, float]) -> list[ReplicaState]:
        w = work[1] + self.router_config.prefill_weight * work[0]
        with self._lock:
            known = [r.ema_tps for r in self.replicas if r.ema_tps]
            prior = sum(known) / len(known) if known else 1.0
            # on a tie (idle replicas, one not measured yet: its speed is the prior), the unmeasured one first, so
            # it is measured even when the known one finishes each request before the next arrives
            scored = [((r.outstanding(self.router_config.prefill_weight) + w) / (r.ema_tps or prior),
                       r.ema_tps is not None, r.index, r) for r in self.replicas]
        scored.sort(key=lambda x: x[:3])
        return [x[3] for x in scored]

    def _track(self, rep: ReplicaState, handle: Any, request: Any, work: tuple[int, float]) -> None:
        with self._lock:
            self._ids += 1
            key = self._ids
            rep.live[key] = _Live(work[0], work[1])
            rep.served += 1
            if rep._window_start is None:
                rep._window_start = self._clock()
        # the engine's own push, once: a sequence moved to another replica (`adopt`) is tracked there instead
        push = handle.__dict__.setdefault("_untracked_push", handle._push)

        def tracked_push(chunk: Any) -> None:
            self._observe(rep, key, chunk)
            push(chunk)

        handle._push = tracked_push  # the engine delivers chunks through this attribute (see module docstring)

    def _observe(self, rep: ReplicaState, key: int, chunk: Any) -> None:
        now = self._clock()
        n = len(getattr(chunk, "token_ids", ()) or ())
        with self._lock:
            live = rep.live.get(key)
            if live is not None:
                if n:
                    live.prompt_left = 0
                    live.predict_left = max(0.0, live.predict_left - n)
                if chunk.done:
                    del rep.live[key]
            rep.tokens += n
            rep._window_tokens += n
            start = rep._window_start if rep._window_start is not None else now
            busy = rep._window_busy + (now - start)
            if busy >= self.router_config.sample_s and rep._window_tokens:
                rate = rep._window_tokens / busy
                a = self.router_config.alpha
                rep.ema_tps = rate if rep.ema_tps is None else a * rate + (1 - a) * rep.ema_tps
                start, rep._window_busy, rep._window_tokens = now, 0.0, 0
            rep._window_start = start
            if not rep.live:
                # idle time is not slowness: the stretch ends here and the window resumes when work arrives again
                rep._window_busy += now - start
                rep._window_start = None


class SlowedExecutor:
    """TEST HOOK: an executor that sleeps `delay_s` before every step of `inner` (to make one replica slow in
    routing tests and benchmarks). Everything else passes through."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.inner = inner
        self.delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, seq_ids: list[int], tokens: list[list[int]]) -> Any:
        time.sleep(self.delay_s)
        return self.inner.step(seq_ids, tokens)


def build_replica_executors(model_path: Any, cluster: Any, strategy: str = "auto", max_replicas: int = 0,
                            dtype: Any = None, exclude: Sequence[str] = (),
                            kv_cache_type: str | None = None) -> list[Any]:
    """One RayExecutor per replica the scheduler places on disjoint nodes of `cluster` (scheduler
    `plan_replicas`: plan, remove the nodes used, repeat while the model fits; `max_replicas` 0 = no limit).
    Raises scheduler InfeasiblePlanError when not even one copy fits."""
    import torch

    from ..runtime.distributed_run import build_executor
    from ..runtime.recovery import planning_inputs, weight_sources_for
    from ..scheduler.config import PlanConfig
    from ..scheduler.planner import plan_replicas

    dtype = dtype if dtype is not None else torch.float32
    keep = [n.name for n in cluster.nodes() if n.name not in set(exclude)]
    measurement = cluster.measure()
    profile, spec, workload = planning_inputs(model_path, measurement, keep, dtype, kv_cache_type)
    plans = plan_replicas(profile, spec, workload, PlanConfig(strategy=strategy), max_replicas,
                          weight_sources_for(model_path, cluster, measurement, keep))
    log.info("%d replica(s): %s", len(plans), [sorted(p.nodes) for p in plans])
    executors: list[Any] = []
    try:
        for p in plans:
            executors.append(build_executor(model_path, cluster, plan=p, dtype=dtype, kv_cache_type=kv_cache_type))
    except BaseException:
        for ex in executors:
            ex.close()
        raise
    return executors
