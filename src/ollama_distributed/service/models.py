"""Loaded models: load off the event loop, share one engine per weights file, keep_alive expiry, /api/ps.

A *runner* is one loaded weights file: tokenizer + chat template + executor (in-process `LocalExecutor`, or the
Ray executor from `runtime.distributed_run.build_executor` when the server was started with --address or
--local-nodes) + `InferenceEngine`. Names that point at the same blob (a `cp`) share the runner, as Ollama shares
its llama-server process; per-name settings (Modelfile PARAMETERs, SYSTEM, TEMPLATE) travel with the request.
Expiry follows Ollama's scheduler (server/sched.go): a runner in use never expires; when its last request ends,
it expires keep_alive later (0 = unload now, negative = never); at most `max_loaded` runners stay loaded, the
least recently used idle one making room.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from ..model.options import GenerationOptions
from .json_format import ConstrainedExecutor
from .settings import FOREVER, ServerSettings
from .store import MESSAGES_LAYER, PARAMS_LAYER, SYSTEM_LAYER, TEMPLATE_LAYER, ModelEntry, ModelStore

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[Path], Any]


@dataclass
class Runner:
    """One loaded weights file and the engine serving it."""

    key: str
    name: str  # display name of the model that loaded it most recently
    entry: ModelEntry
    tokenizer: Any
    chat_template: Any | None
    executor: ConstrainedExecutor
    engine: Any
    load_duration_ns: int
    loaded_at: float = field(default_factory=time.time)
    active: int = 0
    expires_at: float = math.inf  # wall-clock seconds; inf while in use or kept forever
    keep_alive_s: float = 300.0
    last_used: float = field(default_factory=time.monotonic)
    learning: Any | None = None  # service.learning.LearningLoop that requests on this runner report to
    recovery: Any | None = None  # runtime.recovery.Recovery re-placing the model after a lost shard (Ray only)

    @property
    def unplaced(self) -> bool:
        """The cluster lost capacity and the model is not placed (its requests fail until it is re-placed)."""
        from ..runtime.recovery import UnplacedExecutor

        return isinstance(self.executor.inner, UnplacedExecutor)

    @property
    def context_length(self) -> int:
        return int(self.engine.context_limit)


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
        """In-process LocalExecutor, or the Ray executor over the cluster the settings describe."""
        import torch

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.settings.dtype]
        if self.settings.distributed:
            from ..runtime.distributed_run import build_executor

            return build_executor(path, self.cluster(), self.settings.strategy, dtype=dtype)
        from ..runtime.local_executor import LocalExecutor

        # The KV cache grows on demand, so the executor's default bound (the model's context, capped) costs
        # nothing up front; requests' num_ctx is clamped to it by the engine.
        return LocalExecutor(path, dtype=dtype)

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
        self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for key in list(self._runners):
            await self._unload(key)
        if self._cluster is not None:
            self._cluster.shutdown()  # main thread, like its start

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            for key, r in list(self._runners.items()):
                if r.active == 0 and r.expires_at <= now:
                    log.info("model %s expired (keep_alive %ss); unloading", r.name, r.keep_alive_s)
                    await self._unload(key)

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
        lock = self._locks.setdefault(key, asyncio.Lock())
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
            runner.expires_at = math.inf
            runner.last_used = time.monotonic()
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
            await asyncio.to_thread(r.engine.close)
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
        from ..runtime.engine import InferenceEngine

        t0 = time.perf_counter()
        path = entry.model_path
        log.info("loading %s from %s", entry.name.display, path)
        tokenizer = Tokenizer.from_gguf(path)
        try:
            chat_template = ChatTemplate.from_gguf(path)
        except Exception as exc:  # noqa: BLE001 - a model without a usable chat template still completes
            log.warning("model %s has no usable chat template (%s); /api/chat will use a plain format", key, exc)
            chat_template = None
        inner = self.executor_factory(path)
        executor = ConstrainedExecutor(inner, tokenizer)
        recovery = self._recovery_for(entry.name.display, path) if hasattr(inner, "placement") else None
        engine = InferenceEngine(
            executor, tokenizer, max_batch=self.settings.num_parallel, max_queue=self.settings.max_queue,
            name=entry.name.display, recover=_recover_into(recovery) if recovery is not None else None,
        )
        took = int((time.perf_counter() - t0) * 1e9)
        log.info("loaded %s in %.2f s", entry.name.display, took / 1e9)
        if self.learning is not None and self.settings.distributed:
            # Calibration needs the plan the runtime placed and the cluster's measurements (in-process models
            # have neither; their requests still feed the metrics through `track`).
            self.learning.attach_loaded(entry.name.display, path, inner.placement(), self.cluster(),
                                        self.settings.dtype)
        return Runner(key=key, name=entry.name.display, entry=entry, tokenizer=tokenizer,
                      chat_template=chat_template, executor=executor, engine=engine, load_duration_ns=took,
                      learning=self.learning, recovery=recovery)

    def _recovery_for(self, name: str, path: Path) -> Any:
        """The engine's recover callback for a model on the Ray cluster (runtime/recovery.py): re-plan on the
        surviving nodes, record the failure against the strategy in the learning loop, back off flaky nodes."""
        if not self.settings.distributed or self.executor_factory != self._default_executor:
            return None  # only executors this manager builds on its cluster can be re-planned by it
        import torch

        from ..runtime.recovery import NodeHealth, Recovery

        if self._node_health is None:
            self._node_health = NodeHealth()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.settings.dtype]
        learning = self.learning

        def on_event(rec: Any) -> None:
            if learning is None:
                return
            # the failure counts against the strategy that was running (PartitionManager via the loop)
            learning.report(name, None, success=False, error=f"{rec.report.kind}: {rec.report.detail}")
            if rec.error is None:
                nodes = ",".join(rec.report.failed_nodes) or None
                learning.record_recovery(name, f"{rec.report.detail}; re-planned in {rec.seconds:.2f} s "
                                         f"(excluded: {', '.join(rec.excluded) or 'none'})", node=nodes)
                # attach may measure the cluster (seconds): keep it off the engine thread
                threading.Thread(target=_attach_quietly, args=(learning, name, path, rec.placement,
                                                               self.cluster(), self.settings.dtype),
                                 daemon=True).start()
            else:
                learning.events.record("recovery_failed", f"{name}: {rec.error}", level="error", model=name)

        return Recovery(path, self.cluster(), self.settings.strategy, dtype, self._node_health, on_event)

    def drain(self, node: str) -> list[str]:
        """Move every model off `node` without failing requests (blocking): plan nothing on it any more, and for
        each model with a shard there, between two engine steps, replace its shards with a placement on the other
        nodes and replay the in-flight sequences (the same replay a failure uses). Returns the moved models.
        Raises NodeNotFoundError for an unknown node; CapacityError when the other nodes cannot hold a model
        (that model is then unplaced, its requests end with the shortfall, and it is re-placed at its next
        load, as after a failure)."""
        cluster = self.cluster()
        if cluster is None:
            raise ValueError("node drain needs a cluster (serve with --address or --local-nodes)")
        cluster.node(node)  # NodeNotFoundError for a name the cluster does not know
        from ..runtime.recovery import NodeHealth

        if self._node_health is None:
            self._node_health = NodeHealth()
        self._node_health.drain(node)
        moved = []
        for r in list(self._runners.values()):
            if r.recovery is None or r.unplaced:
                continue
            placement = r.executor.inner.placement()
            if not any(sh.get("node") == node for st in placement.get("stages", []) for sh in st["shards"]):
                continue
            exclude = self._node_health.backed_off()

            def move(r: Runner = r, exclude: set[str] = exclude) -> None:
                # Break before make, on the engine thread between steps: the running shards hold their nodes'
                # memory budget (Ray resources), so a new placement on the same nodes could not start beside
                # them. Requests pause while the new shards start, then every sequence is replayed.
                from ..runtime.recovery import CapacityError, UnplacedExecutor

                old = r.executor.inner
                old.close()
                try:
                    new = r.recovery.place(exclude=exclude)
                except CapacityError as cap:
                    r.executor.rebind(UnplacedExecutor(old.config, old.max_seq_len, cap))
                    raise
                r.executor.rebind(new)

            r.engine.replace_executor(r.executor, close_old=False, prepare=move)
            new_inner = r.executor.inner
            log.info("drained %s: %s moved to %s", node, r.name, _placement_of_nodes(new_inner))
            if self.learning is not None:
                self.learning.events.record("drain", f"{r.name}: moved off {node}", model=r.name, node=node)
                threading.Thread(target=_attach_quietly, args=(self.learning, r.name, r.entry.model_path,
                                                               new_inner.placement(), cluster, self.settings.dtype),
                                 daemon=True).start()
            moved.append(r.name)
        return moved

    # ---- introspection ------------------------------------------------------------------------------------------

    def recovery_status(self) -> dict[str, Any]:
        """Fault-tolerance state for the API: per-node failure counts / back-off, and each model's recent
        recoveries (what failed, how long re-placing took, which nodes were left out)."""
        nodes = self._node_health.to_dict() if self._node_health is not None else {}
        models = {}
        for r in self._runners.values():
            if r.recovery is None:
                continue
            models[r.name] = {
                "unplaced": r.unplaced,
                "recoveries": [{"kind": rec.report.kind, "detail": rec.report.detail, "seconds": round(rec.seconds, 3),
                                "excluded": list(rec.excluded), "error": rec.error, "time": rec.at}
                               for rec in r.recovery.records],
            }
        return {"nodes": nodes, "models": models}

    def runners(self) -> list[Runner]:
        return list(self._runners.values())

    def placement(self, runner: Runner) -> dict[str, Any]:
        """The runner's plan JSON with node_id/pid per shard: the executor's own `placement()` when it has one
        (the Ray executor), else the in-process single-shard plan."""
        inner = runner.executor.inner
        fn = getattr(inner, "placement", None)
        if callable(fn):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - status must not fail because a node is unreachable
                log.warning("placement() of %s failed: %s", runner.name, exc)
        return local_plan(runner.name, inner.config, runner.entry.size)

    def ps_entry(self, runner: Runner) -> dict[str, Any]:
        """One `/api/ps` item (+ our `placement` summary and live engine counters)."""
        entry = runner.entry
        exp = runner.expires_at
        if math.isinf(exp):
            expires = datetime.now(timezone.utc) + timedelta(days=365 * 100)
        else:
            expires = datetime.fromtimestamp(exp, timezone.utc)
        plan = self.placement(runner)
        shards = [s for st in plan.get("stages", []) for s in st.get("shards", [])]
        nodes = sorted({str(s.get("node_id", s.get("node"))) for s in shards})
        return {
            "name": runner.name,
            "model": runner.name,
            "size": entry.size,
            "digest": entry.digest,
            "details": entry.details,
            "expires_at": expires.isoformat(),
            "size_vram": 0,
            "context_length": runner.context_length,
            "placement": {
                "strategy": plan.get("strategy", "single"),
                "stages": len(plan.get("stages", [])),
                "nodes": nodes,
                "shards": len(shards),
            },
            "engine": {**runner.engine.stats(), "kv_sequences": runner.executor.live_sequences},
        }


def _recover_into(recovery: Any) -> Callable[[Exception, Any], Any]:
    """Adapt a runtime Recovery to the engine, whose executor is our ConstrainedExecutor wrapper: the wrapper is
    kept (requests' JSON constraints are registered on it) and gets the new inner executor."""

    def recover(exc: Exception, failed: ConstrainedExecutor) -> Any:
        new = recovery(exc, failed.inner)
        if new is None:
            return None
        failed.rebind(new)
        return failed

    return recover


def _placement_of_nodes(executor: Any) -> str:
    stages = executor.placement().get("stages", [])
    return ", ".join("+".join(sh["node"] for sh in st["shards"]) for st in stages)


def _attach_quietly(learning: Any, name: str, path: Path, placement: Any, cluster: Any, dtype: str) -> None:
    try:
        learning.attach_loaded(name, path, placement, cluster, dtype)
    except Exception as exc:  # noqa: BLE001 - the learning loop is advisory
        log.warning("could not attach the recovered plan of %s to the learning loop: %s", name, exc)


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
