"""Between requests: use nodes that joined, apply drift re-plans, retire dropped replicas (issues 6 and 7).

The model manager's reaper calls `PlacementLoop.tick()` every 0.25 s; at most every `placement_poll_s` it
  * asks Ray which nodes are alive (one GCS call) and marks every loaded model when nodes joined; a replica that
    lost a node while idle is re-placed at once (or dropped when it cannot be and another replica serves) —
    a busy one learns it at its next step and recovers in its engine;
  * for each model that is idle — no request holds it and no replica has queued or running work — and while
    holding the lock `acquire` takes, so no request can start meanwhile (new ones wait, as for a load):
      - nodes joined: place extra replicas on the nodes no replica uses, up to max_replicas (0 = as many as fit);
        at the limit, with `replan` on, re-plan a single copy on every usable node and switch to the new plan
        when it is predicted at least `MIN_GAIN` faster on the same measurements;
      - with `replan` on, apply the learning loop's pending drift proposal (service/learning.py);
  * closes replicas that were dropped (could not be re-placed after a failure) once their requests ended.
A switch is break-before-make on the replica's engine thread between two steps (`move_replica`, the machinery
`node drain` uses): the running shards hold their nodes' memory budget, so new shards could not start beside them.
Nothing is switched under an in-flight request: the model is idle and stays so while the lock is held.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from .replicas import Replica, plan_on, predicted_ms, usable_nodes

log = logging.getLogger(__name__)

MIN_GAIN = 0.10  # a node join switches plans only for a predicted gain of at least 10 % (probe noise is ~5 %)


def move_replica(manager: Any, runner: Any, replica: Replica, plan: Any | None, why: str) -> None:
    """Switch `replica` to `plan` (None: the scheduler's plan on the nodes its recovery may use), between two
    engine steps, replaying its running sequences. When `plan` cannot start, falls back to a fresh plan; when
    nothing fits, the replica is left unplaced (or dropped, when another replica serves) and CapacityError is
    raised."""
    from ..runtime.recovery import CapacityError, UnplacedExecutor

    build = manager.builder(runner.entry.model_path)

    def move() -> None:
        old = replica.executor.inner
        old.close()
        new = None
        if plan is not None:
            try:
                new = build(plan)
            except Exception as exc:  # noqa: BLE001 - fall back to what the scheduler picks now
                log.warning("%s: plan %s did not start (%s); re-planning", runner.name, plan.plan_id, exc)
        if new is None:
            try:
                new = replica.recovery.place(exclude=replica.recovery.health.backed_off())
            except CapacityError as cap:
                replica.executor.rebind(UnplacedExecutor(old.config, old.max_seq_len, cap))
                raise
        replica.executor.rebind(new)

    t0 = time.perf_counter()
    try:
        replica.engine.replace_executor(replica.executor, close_old=False, prepare=move)
    except CapacityError:
        if len(runner.live_replicas) > 1 and runner.router is not None:
            runner.router.remove(replica.engine)
            replica.dropped = True
        raise
    log.info("%s: replica moved in %.2f s (%s)", runner.name, time.perf_counter() - t0, why)


def use_new_capacity(manager: Any, runner: Any) -> str | None:
    """Nodes joined (blocking; the runner is idle and locked): extra replicas up to max_replicas, else a plan
    predicted faster. Returns what was done (None: nothing)."""
    from ..scheduler.errors import InfeasiblePlanError
    from ..scheduler.plan import PartitionPlan

    s = manager.settings
    cluster = manager.cluster()
    health = manager.node_health()
    path, name = runner.entry.model_path, runner.name
    live = runner.live_replicas
    if not live or any(r.unplaced or r.recovery is None for r in live):
        return None  # an unplaced model is re-placed by its next request; in-process models have no cluster
    added = 0
    while s.max_replicas == 0 or len(runner.live_replicas) < s.max_replicas:
        used = {n for r in runner.live_replicas for n in r.nodes()}
        keep = usable_nodes(cluster, health.backed_off() | used)
        try:
            plans = plan_on(path, cluster, keep, s.strategy, manager.torch_dtype(), 1, s.kv_cache_type).plans
        except InfeasiblePlanError as exc:
            log.info("%s: no extra replica on %s: %s", name, keep, exc)
            break
        replica = manager.make_replica(runner, manager.builder(path)(plans[0]))
        runner.replicas.append(replica)
        runner.engine.add(replica.engine, replica.executor)
        added += 1
        _event(manager, "replica_added", f"{name}: replica {len(runner.live_replicas)} placed on "
               f"{', '.join(sorted(replica.nodes()))} (nodes joined)", name)
    if added:
        manager.attach_learning(runner)
        return f"{added} replica(s) added"
    if not s.replan or len(live) != 1:
        return None
    replica = live[0]
    keep = usable_nodes(cluster, health.backed_off())
    try:
        plans, inputs, _ = plan_on(path, cluster, keep, s.strategy, manager.torch_dtype(), 1, s.kv_cache_type)
        current = PartitionPlan.from_dict(replica.placement())
        cur_ms, new_ms = predicted_ms(current, inputs), predicted_ms(plans[0], inputs)
    except Exception as exc:  # noqa: BLE001 - e.g. a node of the running plan is backed off: nothing to compare
        log.info("%s: no re-plan after the join: %s", name, exc)
        return None
    new = plans[0]
    if new.plan_id == current.plan_id or new_ms > (1 - MIN_GAIN) * cur_ms:
        msg = (f"{name}: keeps plan {current.plan_id} after nodes joined (predicted {cur_ms:.3f} ms/token; best "
               f"plan now {new.strategy} {new.plan_id} {new_ms:.3f}, needs a {MIN_GAIN * 100:.0f}% gain)")
        log.info(msg)
        if manager.learning is not None:
            manager.learning.events.record("replan_skipped", msg, model=name, plan_id=current.plan_id,
                                           best_plan_id=new.plan_id, current_ms=cur_ms, best_ms=new_ms,
                                           min_gain=MIN_GAIN)
        return None
    why = (f"nodes joined: {new.strategy} {new.plan_id} on {', '.join(sorted(set(new.nodes)))} is predicted "
           f"{new_ms:.3f} ms/token vs {cur_ms:.3f} for the running {current.plan_id}")
    t0 = time.perf_counter()
    move_replica(manager, runner, replica, new, why)
    if manager.learning is not None:
        manager.learning.replan_applied(name, replica.placement(), reason=why, seconds=time.perf_counter() - t0)
    return why


def apply_drift(manager: Any, runner: Any) -> str | None:
    """Apply the learning loop's pending re-plan proposal of `runner` (blocking; idle and locked)."""
    learning = manager.learning
    proposal = learning.pending_replan(runner.name) if learning is not None else None
    if proposal is None:
        return None
    live = runner.live_replicas
    if len(live) != 1 or live[0].recovery is None or live[0].unplaced:
        learning.replan_dismissed(runner.name, "re-plan proposals apply to a single placed copy")
        return None
    t0 = time.perf_counter()
    try:
        move_replica(manager, runner, live[0], proposal.plan, proposal.reason)
    except Exception as exc:  # noqa: BLE001 - CapacityError & co: the model is unplaced, its next load re-places it
        learning.replan_dismissed(runner.name, f"applying the proposal failed: {exc}")
        return None
    learning.replan_applied(runner.name, live[0].placement(), reason=proposal.reason,
                            seconds=time.perf_counter() - t0)
    return proposal.reason


def request_replan(manager: Any, runner: Any, exclude: set[str]) -> Any:
    """Queue the scheduler's plan for `runner` on the usable nodes minus `exclude` as its pending re-plan (an
    operator's request; blocking: may measure the cluster). Applied when the model is idle, like a drift
    proposal. Raises scheduler InfeasiblePlanError when those nodes cannot hold it, ValueError when the model
    is replicated or not on the cluster."""
    live = runner.live_replicas
    s = manager.settings
    if not s.replan:
        raise ValueError("re-planning is off on this server (serve --no-replan / OLLAMA_DISTRIBUTED_REPLAN=0)")
    if manager.learning is None or len(live) != 1 or live[0].recovery is None:
        raise ValueError(f"{runner.name}: re-planning applies to a single copy on the cluster")
    keep = usable_nodes(manager.cluster(), manager.node_health().backed_off() | set(exclude))
    plans, inputs, _ = plan_on(runner.entry.model_path, manager.cluster(), keep, s.strategy, manager.torch_dtype(),
                               1, s.kv_cache_type)
    new = plans[0]
    reason = (f"re-plan requested{' without ' + ', '.join(sorted(exclude)) if exclude else ''}: {new.strategy} "
              f"{new.plan_id} on {', '.join(sorted(set(new.nodes)))}")
    return manager.learning.propose(runner.name, new, reason, predicted_ms(new, inputs))


def _nodes_text(replica: Replica) -> str:
    stages = replica.placement().get("stages", [])
    return ", ".join("+".join(sh["node"] for sh in st["shards"]) for st in stages)


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the learning loop is advisory
        log.warning("learning-loop update failed: %s", exc)


def _event(manager: Any, kind: str, message: str, model: str) -> None:
    log.info(message)
    if manager.learning is not None:
        manager.learning.events.record(kind, message, model=model)


def drain_node(manager: Any, node: str) -> list[str]:
    """Move every model off `node` without failing requests (blocking): plan nothing on it any more, and for
    each replica with a shard there, between two engine steps, replace its shards with a placement on the
    other nodes and replay the in-flight sequences (the same replay a failure uses). Returns the moved models.
    Raises NodeNotFoundError for an unknown node; CapacityError when the other nodes cannot hold a model
    (that model is then unplaced, its requests end with the shortfall, and it is re-placed at its next
    load, as after a failure) — a replica that cannot move while another serves is dropped instead."""
    cluster = manager.cluster()
    if cluster is None:
        raise ValueError("node drain needs a cluster (serve with --address or --local-nodes)")
    cluster.node(node)  # NodeNotFoundError for a name the cluster does not know
    manager.node_health().drain(node)
    moved = []
    for r in list(manager.runners()):
        for rep in list(r.live_replicas):
            if rep.recovery is None or rep.unplaced or node not in rep.nodes():
                continue
            try:
                move_replica(manager, r, rep, None, f"moved off {node} (drain)")
            except Exception:
                if not rep.dropped:
                    raise  # the model is unplaced: the API reports the shortfall
                continue  # a replica that cannot move is dropped; the others keep serving
            log.info("drained %s: %s moved to %s", node, r.name, _nodes_text(rep))
            if manager.learning is not None:
                manager.learning.events.record("drain", f"{r.name}: moved off {node}", model=r.name, node=node)
                threading.Thread(target=_quietly, args=(manager.attach_learning, r), daemon=True).start()
            if r.name not in moved:
                moved.append(r.name)
    return moved


class PlacementLoop:
    """The reaper's periodic placement work (see module docstring)."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self._next = 0.0
        self._known: set[str] | None = None

    async def tick(self) -> None:
        m = self.manager
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + m.settings.placement_poll_s
        for r in m.runners():
            for rep in [rep for rep in r.replicas if rep.dropped and rep.idle()]:
                r.replicas.remove(rep)
                await asyncio.to_thread(rep.engine.close)
                log.info("closed a dropped replica of %s", r.name)
        if not m.settings.distributed or getattr(m, "_cluster", None) is None:
            return
        names = await asyncio.to_thread(lambda: {n.name for n in m.cluster().nodes()})
        joined = names - self._known if self._known is not None else set()
        left = self._known - names if self._known is not None else set()
        self._known = names
        if left:
            for r in m.runners():
                for rep in r.live_replicas:
                    if rep.recovery is not None and not rep.unplaced and rep.nodes() & left:
                        await self._repair(r, rep, left)
        if joined:
            log.info("node(s) joined: %s", ", ".join(sorted(joined)))
            for r in m.runners():
                r.capacity_changed = True
        for r in m.runners():
            drift = m.settings.replan and m.learning is not None and m.learning.pending_replan(r.name) is not None
            if not (r.capacity_changed or drift) or not r.idle():
                continue
            async with m.lock_for(r.key):
                if m.runners().count(r) == 0 or not r.idle():
                    continue  # unloaded, or a request started while we waited for the lock
                if r.capacity_changed:
                    r.capacity_changed = False
                    await asyncio.to_thread(_guarded, use_new_capacity, m, r)
                if drift:
                    await asyncio.to_thread(_guarded, apply_drift, m, r)


    async def _repair(self, runner: Any, replica: Replica, left: set[str]) -> None:
        """A node of `replica` is gone while the replica idles: re-place it now (a busy replica finds out at its
        next step and recovers in its engine, so it is left alone). With other replicas serving it leaves routing
        meanwhile, and is dropped when it cannot be re-placed (`move_replica`); alone, it is re-placed under the
        runner's lock, so no request starts meanwhile."""
        m = self.manager
        lost = ", ".join(sorted(replica.nodes() & left))
        others = [x for x in runner.live_replicas if x is not replica and not x.unplaced]
        if others:
            if runner.engine.remove(replica.engine) is None:
                return
            if not replica.idle():
                runner.engine.add(replica.engine, replica.executor)
                return
            ok = await self._move_lost(runner, replica, lost, len(others))
            if ok:
                runner.engine.add(replica.engine, replica.executor)
            else:
                replica.dropped = True
            return
        async with m.lock_for(runner.key):
            if runner in m.runners() and runner.idle():
                await self._move_lost(runner, replica, lost, 0)

    async def _move_lost(self, runner: Any, replica: Replica, lost: str, others: int) -> bool:
        m = self.manager
        try:
            await asyncio.to_thread(move_replica, m, runner, replica, None, f"lost node(s) {lost}")
        except Exception as exc:  # noqa: BLE001 - CapacityError & co: dropped (others serve) or unplaced
            kind = "replica_dropped" if others else "recovery_failed"
            _event(m, kind, f"{runner.name}: a replica lost {lost} and could not be re-placed ({exc}); "
                   f"{others} replica(s) keep serving", runner.name)
            return False
        if m.learning is not None:
            m.learning.record_recovery(runner.name, f"lost node(s) {lost} while idle; replica re-placed on "
                                       f"{_nodes_text(replica)}", node=lost)
            threading.Thread(target=_quietly, args=(m.attach_learning, runner), daemon=True).start()
        return True


def _guarded(fn: Any, manager: Any, runner: Any) -> None:
    try:
        fn(manager, runner)
    except Exception:  # noqa: BLE001 - the next request re-places an unplaced model
        log.exception("%s for %s failed", fn.__name__, runner.name)
