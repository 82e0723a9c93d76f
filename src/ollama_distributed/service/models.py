"""Loaded models: load off the event loop, share one engine per weights file, keep_alive expiry, /api/ps.

A *runner* is one loaded weights file: tokenizer + chat template + executor (in-process `LocalExecutor`, or the
Ray executor from `runtime.distributed_run.build_executor` when the server was started with --address or
--local-nodes) + `InferenceEngine`. Names that point at the same blob (a `cp`) share the runner, as Ollama shares
its llama-server process; per-name settings (Modelfile PARAMETERs, SYSTEM, TEMPLATE) travel with the request.
With max_replicas > 1 (or 0) a runner holds several replicas of the model on disjoint nodes behind a router
(service/replicas.py); with autotune, a single copy's plan is the fastest of the top candidates measured at load
(service/autotune.py); between requests the placement loop uses nodes that joined and applies drift re-plans
(service/placement_loop.py).
Expiry follows Ollama's scheduler (server/sched.go): a runner in use never expires; when its last request ends,
it expires keep_alive later (0 = unload now, negative = never); at most `max_loaded` runners stay loaded, the
least recently used idle one making room.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..model.options import GenerationOptions
from . import model_status
from .live_executor import LiveExecutor
from .model_status import local_node_id, local_plan  # noqa: F401 (re-exported for api/)
from .replicas import Replica, RoutedExecutors, build_router, slowed
from .router import ReplicaRouter
from .settings import FOREVER, ServerSettings
from .store import MESSAGES_LAYER, PARAMS_LAYER, SYSTEM_LAYER, TEMPLATE_LAYER, ModelEntry, ModelStore

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[Path], Any]


@dataclass
class Runner:
    """One loaded weights file and the replicas serving it (one unless max_replicas allows more), behind a router.

    `engine` is the router (engine-like: submit, stats, context_limit, embedding) and `executor` the facade over
    the replicas' executors (config, and the locked submit + register of JSON-format requests)."""

    key: str
    name: str  # display name of the model that loaded it most recently
    entry: ModelEntry
    tokenizer: Any
    chat_template: Any | None
    load_duration_ns: int
    replicas: list[Replica] = field(default_factory=list)
    router: ReplicaRouter | None = None
    loaded_at: float = field(default_factory=time.time)
    active: int = 0
    expires_at: float = math.inf  # wall-clock seconds; inf while in use or kept forever
    keep_alive_s: float = 300.0
    last_used: float = field(default_factory=time.monotonic)
    learning: Any | None = None  # service.learning.LearningLoop that requests on this runner report to
    capacity_changed: bool = False  # nodes joined since the last placement check (service/placement_loop.py)
    superseded: bool = False  # its name now points at other weights: hidden from /api/ps, unloaded once idle

    @property
    def engine(self) -> ReplicaRouter:
        assert self.router is not None, "runner used before its replicas were placed"
        return self.router

    @property
    def executor(self) -> RoutedExecutors:
        return RoutedExecutors(self.engine)

    @property
    def live_replicas(self) -> list[Replica]:
        """Replicas requests are routed to (not dropped)."""
        return [r for r in self.replicas if not r.dropped]

    @property
    def unplaced(self) -> bool:
        """The cluster lost capacity and no replica of the model is placed (its requests fail until it is
        re-placed)."""
        live = self.live_replicas
        return bool(live) and all(r.unplaced for r in live)

    @property
    def context_length(self) -> int:
        return int(self.engine.context_limit)

    def idle(self) -> bool:
        """No request holds the runner and no replica has queued or running work."""
        return self.active == 0 and all(r.idle() for r in self.replicas)

    def close(self) -> None:
        for r in self.replicas:
            r.engine.close()


@dataclass(frozen=True)
class ModelView:
    """What a request needs: the runner plus the per-name Modelfile settings of the requested name."""

    runner: Runner
    entry: ModelEntry
    base_options: GenerationOptions
    system: str | None
    template: str | None
    messages: list[dict[str, Any]]
    load_duration_ns: int  # time this request waited for a load (0 when it was already loaded)

    @property
    def name(self) -> str:
        return self.entry.name.display


class ModelManager:
    """Loads, shares, expires and unloads runners. Coroutine methods run on the server's event loop; blocking
    work (loading, closing) goes to worker threads."""

    def __init__(self, settings: ServerSettings, store: ModelStore, executor_factory: ExecutorFactory | None = None):
        self.settings = settings
        self.store = store
        self.executor_factory = executor_factory or self._default_executor
        self._cluster: Any = None
        self._cluster_lock = threading.Lock()
        self._runners: dict[str, Runner] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task | None = None
        # The learning loop (api.observability.install sets it): runners report measurements to it.
        self.learning: Any | None = None
        self._node_health: Any = None  # runtime.recovery.NodeHealth, shared by every model (created with Ray)

    # ---- executors ----------------------------------------------------------------------------------------------

    def cluster(self) -> Any:
        """The Ray cluster models run on (created on first use; blocking), or None for in-process serving."""
        if not self.settings.distributed:
            return None
        with self._cluster_lock:
            if self._cluster is None:
                from ..runtime.cluster import cluster_from_cli

                self._cluster = cluster_from_cli(self.settings.address, self.settings.local_nodes,
                                                 self.settings.node_memory)
            return self._cluster

    def _default_executor(self, path: Path) -> Any:
        """In-process LocalExecutor, or one Ray executor on the scheduler's plan for the settings' strategy."""
        if self.settings.distributed:
            first, *extra = self._place(path.stem, path)
            for ex in extra:  # a caller of the factory takes one executor (the manager's own loads take all)
                ex.close()
            return first
        from ..runtime.local_executor import LocalExecutor

        # The KV cache grows on demand, so the executor's default bound (the model's context, capped) costs
        # nothing up front; requests' num_ctx is clamped to it by the engine.
        from ..model.quant import weight_format

        dtype, quant = weight_format(self.settings.dtype)
        return LocalExecutor(path, dtype=dtype, quant=quant, kv_cache_type=self.settings.kv_cache_type)

    def torch_dtype(self) -> Any:
        """What the runtime's `dtype` arguments take: a torch dtype, or the name of a quantised weight format
        ("auto", "int4"), which runtime.distributed_run.resolve_dtype turns into (float32, quant)."""
        import torch

        dense = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        return dense.get(self.settings.dtype, self.settings.dtype)

    def node_health(self) -> Any:
        """The server's runtime.recovery.NodeHealth (failure back-off and drained nodes), shared by every model."""
        if self._node_health is None:
            from ..runtime.recovery import NodeHealth

            self._node_health = NodeHealth()
        return self._node_health

    def builder(self, path: Path) -> Callable[[Any], Any]:
        """plan → a started Ray executor for `path` (wrapped by the slow-node test hook when it is set)."""
        from ..runtime.distributed_run import build_executor

        cluster, dtype, slow = self.cluster(), self.torch_dtype(), self.settings.test_slow_nodes
        kv = self.settings.kv_cache_type
        return lambda plan: slowed(build_executor(path, cluster, plan=plan, dtype=dtype, kv_cache_type=kv), slow)

    def _place(self, name: str, path: Path) -> list[Any]:
        """Started executors for the model's replicas (service/replicas.py `place_model`)."""
        from .replicas import place_model

        return place_model(self, name, path)

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start expiry; with --address/--local-nodes also start or join the Ray cluster. That happens here,
        synchronously, because Ray installs signal handlers and so must start on the main thread (where
        uvicorn runs the lifespan), not in a worker thread at the first model load."""
        if self.settings.distributed:
            # Ray replaces the SIGTERM/SIGINT handlers with ones that exit abruptly; keep uvicorn's, so a stop
            # signal shuts the server down cleanly (and with it the cluster, in close()).
            saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                self.cluster()
            finally:
                for sig, handler in saved.items():
                    if handler is not None:
                        signal.signal(sig, handler)
        if self.learning is not None and self.settings.strategy != "auto":
            # drift proposals stay within the strategy the operator pinned
            from ..scheduler.config import PlanConfig

            self.learning.config = dataclasses.replace(self.learning.config,
                                                       plan=PlanConfig(strategy=self.settings.strategy))
        self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for key in list(self._runners):
            await self._unload(key)
        if self._cluster is not None:
            self._cluster.shutdown()  # main thread, like its start

    async def _reap_forever(self) -> None:
        from .placement_loop import PlacementLoop

        placement = PlacementLoop(self)
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            for key, r in list(self._runners.items()):
                if r.active == 0 and r.expires_at <= now:
                    log.info("model %s expired (keep_alive %ss); unloading", r.name, r.keep_alive_s)
                    await self._unload(key)
            try:
                await placement.tick()
            except Exception:  # noqa: BLE001 - placement improvements are optional; expiry must keep running
                log.exception("placement check failed")

    def lock_for(self, key: str) -> asyncio.Lock:
        """The lock `acquire` takes for a runner: whoever holds it knows no request can start on the runner."""
        return self._locks.setdefault(key, asyncio.Lock())

    # ---- per-request use ----------------------------------------------------------------------------------------

    def view(self, entry: ModelEntry, runner: Runner, waited_ns: int) -> ModelView:
        params: dict[str, Any] = {}
        system = template = None
        messages: list[dict[str, Any]] = []
        for layer in entry.layers:
            if layer.media_type == PARAMS_LAYER:
                params = json.loads(self.store.read_blob_text(layer.digest))
            elif layer.media_type == SYSTEM_LAYER:
                system = self.store.read_blob_text(layer.digest)
            elif layer.media_type == TEMPLATE_LAYER:
                template = self.store.read_blob_text(layer.digest)
            elif layer.media_type == MESSAGES_LAYER:
                messages = json.loads(self.store.read_blob_text(layer.digest))
        base = GenerationOptions.from_dict({"num_ctx": self.settings.num_ctx})
        base = GenerationOptions.from_modelfile(params, base=base) if params else base
        return ModelView(runner, entry, base, system, template, messages, waited_ns)

    async def acquire(self, entry: ModelEntry) -> ModelView:
        """Load (or reuse) the runner for `entry` and mark it in use; pair with `release`."""
        key = str(entry.model_path.resolve())
        lock = self.lock_for(key)
        t0 = time.perf_counter()
        async with lock:
            runner = self._runners.get(key)
            if runner is not None and runner.unplaced:
                # capacity was lost earlier: try placing the model again (on whatever the cluster has now)
                log.info("model %s is not placed (lost capacity); re-placing it", runner.name)
                await self._unload(key)
                runner = None
            if runner is None:
                await self._make_room()
                runner = await asyncio.to_thread(self._load, key, entry)
                self._runners[key] = runner
            runner.active += 1
            runner.name = entry.name.display
            runner.entry = entry
            runner.superseded = False
            runner.expires_at = math.inf
            runner.last_used = time.monotonic()
        await self.supersede(entry)
        waited = int((time.perf_counter() - t0) * 1e9)
        return self.view(entry, runner, waited if waited > 1_000_000 else 0)

    def release(self, view: ModelView, keep_alive_s: float | None) -> None:
        """End of one request: set the expiry from its keep_alive (None → server default)."""
        r = view.runner
        r.active = max(0, r.active - 1)
        ka = self.settings.keep_alive_s if keep_alive_s is None else keep_alive_s
        r.keep_alive_s = ka
        r.last_used = time.monotonic()
        if r.active == 0:
            r.expires_at = math.inf if ka == FOREVER else time.time() + ka

    async def supersede(self, entry: ModelEntry) -> None:
        """One loaded copy per name: `entry` is what its name points at now (after a pull or create, or at a
        request), so a runner still loaded under that name from other weights is unloaded now when idle, or
        hidden from /api/ps and unloaded by the reaper once its requests end. A runner of the same weights just
        takes the new entry (digest, Modelfile settings)."""
        key = str(entry.model_path.resolve())
        name = entry.name.display
        for r in list(self._runners.values()):
            if r.name != name:
                continue
            if r.key == key:
                r.entry = entry
                continue
            log.info("model %s now points at %s: replacing the copy loaded from %s", name, entry.model_path, r.key)
            if r.active == 0:
                await self._unload(r.key)
            else:
                r.superseded = True
                r.expires_at = 0.0

    async def unload(self, entry: ModelEntry) -> bool:
        """Unload the runner of `entry` now (if loaded and idle). True if something was unloaded."""
        key = str(entry.model_path.resolve())
        r = self._runners.get(key)
        if r is None:
            return False
        if r.active:
            r.expires_at = 0.0  # the reaper unloads it once the running requests end
            return False
        await self._unload(key)
        return True

    async def _unload(self, key: str) -> None:
        r = self._runners.pop(key, None)
        if r is not None:
            if r.learning is not None:
                r.learning.detach(r.name)
            await asyncio.to_thread(r.close)
            log.info("unloaded %s", r.name)

    async def _make_room(self) -> None:
        while len(self._runners) >= self.settings.max_loaded:
            idle = [r for r in self._runners.values() if r.active == 0]
            if not idle:
                return  # everything is busy: load anyway rather than fail (memory permitting)
            victim = min(idle, key=lambda r: r.last_used)
            log.info("unloading %s to make room (max_loaded=%d)", victim.name, self.settings.max_loaded)
            await self._unload(victim.key)

    def _load(self, key: str, entry: ModelEntry) -> Runner:
        from ..model.chat_template import ChatTemplate
        from ..model.tokenizer import Tokenizer

        t0 = time.perf_counter()
        path = entry.model_path
        name = entry.name.display
        log.info("loading %s from %s", name, path)
        tokenizer = Tokenizer.from_gguf(path)
        try:
            chat_template = ChatTemplate.from_gguf(path)
        except Exception as exc:  # noqa: BLE001 - a model without a usable chat template still completes
            log.warning("model %s has no usable chat template (%s); /api/chat will use a plain format", key, exc)
            chat_template = None
        own = self.settings.distributed and self.executor_factory == self._default_executor
        inners = self._place(name, path) if own else [self.executor_factory(path)]
        runner = Runner(key=key, name=name, entry=entry, tokenizer=tokenizer, chat_template=chat_template,
                        load_duration_ns=0, learning=self.learning)
        try:
            for inner in inners:
                runner.replicas.append(self.make_replica(runner, inner))
        except BaseException:
            for inner in inners[len(runner.replicas):]:
                inner.close()
            runner.close()
            raise
        runner.router = build_router(runner.replicas)
        runner.load_duration_ns = int((time.perf_counter() - t0) * 1e9)
        log.info("loaded %s (%d replica(s)) in %.2f s", name, len(runner.replicas), runner.load_duration_ns / 1e9)
        self.attach_learning(runner)
        return runner

    def make_replica(self, runner: Runner, inner: Any) -> Replica:
        """Wrap a started executor into a replica of `runner`: live-sequence wrapper, engine, and per-replica recovery
        for executors this manager builds on its cluster."""
        from ..runtime.engine import InferenceEngine

        executor = LiveExecutor(inner, runner.tokenizer)
        replica = Replica(executor, None)
        own = self.settings.distributed and self.executor_factory == self._default_executor
        if own and hasattr(inner, "placement"):
            replica.recovery = self._recovery_for(runner, replica)
        replica.engine = InferenceEngine(
            executor, runner.tokenizer, max_batch=self.settings.num_parallel, max_queue=self.settings.max_queue,
            name=runner.name, recover=_recover_into(replica.recovery) if replica.recovery is not None else None,
            hand_off=lambda seqs: _to_survivor(runner, replica, seqs),
        )
        return replica

    def attach_learning(self, runner: Runner, placement: dict[str, Any] | None = None) -> None:
        """Tell the learning loop which plan serves `runner`. One replica: with the profile and measured cluster,
        so its reports calibrate the cost model and can propose re-plans. Several: the first replica's plan, for
        events and strategy metrics only (their reports mix plans, so they calibrate nothing). `placement`: the
        plan a recovery just started (the replica's executor is rebound to it only after the callback)."""
        if self.learning is None or not self.settings.distributed:
            return  # in-process models have no plan or cluster measurements; `track` still feeds the metrics
        live = runner.live_replicas
        if len(live) == 1:
            self.learning.attach_loaded(runner.name, runner.entry.model_path, placement or live[0].placement(),
                                        self.cluster(), self.settings.dtype,
                                        kv_cache_type=self.settings.kv_cache_type)
        elif live:
            self.learning.attach(runner.name, live[0].placement(),
                                 reason=f"{len(live)} replicas; calibration needs a single copy")

    def _recovery_for(self, runner: Runner, replica: Replica) -> Any:
        """One replica's engine recover callback (service/replicas.py `replica_recovery`)."""
        from .replicas import replica_recovery

        return replica_recovery(self, runner, replica)

    def drain(self, node: str) -> list[str]:
        """Move every model off `node` without failing requests (blocking; service/placement_loop.py
        `drain_node`). Returns the moved models."""
        from .placement_loop import drain_node

        return drain_node(self, node)

    # ---- introspection ------------------------------------------------------------------------------------------

    def recovery_status(self) -> dict[str, Any]:
        """Fault-tolerance state for the API (service/model_status.py)."""
        return model_status.recovery_status(self)

    def weight_transfers(self) -> list[dict[str, Any]]:
        """Each node's fetch of model slices it lacked (runtime/weight_fetch.py): bytes, rate, ETA, state."""
        if not self.settings.distributed:
            return []
        from ..runtime.weight_fetch import holder_progress

        return holder_progress()

    def runners(self) -> list[Runner]:
        return list(self._runners.values())

    def placements(self, runner: Runner) -> list[dict[str, Any]]:
        """Each live replica's plan JSON with node_id/pid per shard (service/model_status.py)."""
        return model_status.placements(runner)

    def placement(self, runner: Runner) -> dict[str, Any]:
        """The first replica's plan JSON (see `placements`)."""
        return self.placements(runner)[0]

    def ps_entry(self, runner: Runner) -> dict[str, Any]:
        """One `/api/ps` item (service/model_status.py)."""
        return model_status.ps_entry(self, runner)


def _to_survivor(runner: Runner, replica: Replica, seqs: list[Any]) -> bool:
    """A replica dropped after a failure it could not recover from (service/replicas.py `replica_recovery`)
    hands its requests to a surviving replica, which replays them: the clients' streams go on, not a 500."""
    return bool(replica.dropped and runner.router is not None and runner.router.adopt(seqs, replica.engine))


def _recover_into(recovery: Any) -> Callable[[Exception, Any], Any]:
    """Adapt a runtime Recovery to the engine, whose executor is our LiveExecutor wrapper: the wrapper is kept
    (the engine and router hold it) and gets the new inner executor."""

    def recover(exc: Exception, failed: LiveExecutor) -> Any:
        new = recovery(exc, failed.inner)
        if new is None:
            return None
        failed.rebind(new)
        return failed

    return recover
