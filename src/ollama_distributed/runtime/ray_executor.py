"""`RayExecutor`: runs a PartitionPlan on a Ray cluster — one ShardWorker actor per shard, pinned to the node the
plan names — and satisfies the engine's Executor protocol (runtime/executor.py).

Lifecycle: check the plan (placement.py) → start the actors with NodeAffinitySchedulingStrategy(soft=False) and
the plan's memory reserved from the node's `od_memory_mib` budget → each loads its slice from the model file on
its node (a node without the file first fetches its slice's bytes from this one, runtime/weight_fetch.py) → all
join one torch.distributed world (gloo; NCCL when every shard has a GPU), built once per plan.
Each shard then runs a resident step loop (worker.py `serve`) fed through a step channel (step_loop.py,
channel.py: shared memory on this machine, TCP to others): a step costs one message to and one reply from each
shard, no Ray call; activations move stage to stage, and tensor-parallel partial sums are added, over
torch.distributed between machines and through shared memory between shards on one machine (shm_comm.py);
`step_sampled` samples on the last stage and brings back token ids instead of the vocabulary's logits, and sends
the next decode step before the engine has streamed this one's tokens (lookahead.py), so the shards do not wait
for the driver's turn. Ray keeps placement, membership and the liveness probes. `transport="calls"` drives the same stages with one Ray call per worker per step (the path before
issue 15), `transport="ray"` chains them through Ray object refs (both kept for the benchmarks).

Failure: a dead actor or node surfaces as ExecutorError naming the shard and node; the executor is then broken
(its other shards may sit in a recv) and must be closed and rebuilt — the engine replays sequences onto a new one.
A shard that hangs without dying is found by the adaptive step time-out (runtime/step_timeout.py: a deadline
scaled to the measured step time of steps that size, then a liveness probe of the busy shards): it is killed and
the step raises ShardLostError naming its node.

Rebuilding after a failure keeps what survived: `detach_survivors()` hands the failed executor's shards that are
alive and idle (weights loaded, cache and process groups reset) to the next executor (`reuse=`), which starts
only the shards it cannot take from them. Each shard process opens the model with the fast GGUF header parser
(model/gguf_index.py), so a new shard costs its process start plus reading its own weights.
"""

from __future__ import annotations

import logging
import time
import os
import pickle
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..model.formats import weight_format_name
from ..model.quant import QUANT_FORMATS
from ..model.weights import read_config
from .cluster import ClusterHandle
from .executor import CacheFullError, ExecutorError, ShardLostError
from .placement import PlacementError, ShardPlacement, place, plan_dict
from .channel import ChannelClosed
from .lookahead import Lookahead, Lookaheads, lookahead_depth
from .sampled_steps import apply_sampled, sample_entries
from .step_loop import LOOP_GROUP, LoopEnded, StepLoops, StepTimeoutError
from .step_timeout import StepTimeout, StepTimer

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 8192
_EMBED_SEQ = -1  # engine sequence ids are >= 0; embeddings borrow this one for a single step and free it
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_LOCAL_ADDRESSES = {"127.0.0.1", "localhost", "::1"}
_HEALTH = "health"  # the actors' concurrency group for liveness probes (worker.py ShardWorker.ping)
# Step-channel messages sent and not yet answered: a step sent ahead (lookahead.py) and frees behind it. Below the
# rings' 8 slots (channel.py ShmRing.create), so neither side ever blocks in a send while the other does too.
_MAX_IN_FLIGHT = 4


@dataclass(frozen=True)
class LiveShard:
    """A loaded shard actor that outlived its executor's failure, offered to the next executor (`reuse=`).

    It is reused for a new shard with the same node, ShardSpec, memory reservation, model file, dtype and cache
    bound; otherwise the new executor kills it (freeing its node's reserved memory) before starting shards."""

    actor: Any
    node_id: str
    spec: Any  # model.shard.ShardSpec
    resources: tuple[tuple[str, float], ...]
    gpus: float
    model_path: str
    dtype: str
    kv_cache_type: str | None
    max_seq_len: int
    pid: int | None
    local: bool  # its node is on this machine (its pid may be signalled from here)

    def fits(self, p: ShardPlacement, model_path: str, dtype: str, kv_cache_type: str | None, max_seq_len: int) -> bool:
        return (self.node_id == p.node_id and self.spec == p.spec and self.gpus == p.gpus
                and self.resources == tuple(sorted((p.resources or {}).items()))
                and (self.model_path, self.dtype, self.kv_cache_type, self.max_seq_len)
                == (model_path, dtype, kv_cache_type, max_seq_len))


class RayExecutor:
    """Executor over the shards of `plan` on `cluster` (see module docstring).

    plan: a PartitionPlan or its JSON dict. model_path: GGUF file (nodes without it fetch their
    slices from this process's node) or HF dir (present at this path on every node).
    dtype: compute dtype of weights and KV cache. quant: "int4" for 4-bit layers on CPU workers, "native" for the
    file's own types (model/quant.py; dtype is then float32). kv_cache_type: "f32" | "f16" (None: the format's
    default, model/formats.py kv_cache_type). max_seq_len: KV-cache bound per sequence (default
    min(context, 8192)). transport: "dist" (resident step loops fed through step channels, stages joined by
      torch.distributed; step_loop.py), "calls" (the same stages driven by one Ray call per worker per step, the
      path before issue 15, kept for bench/hot_path_bench.py) or "ray" (object refs per hop).
    micro_batches: pieces a multi-sequence batch is split into so pipeline stages overlap. None: one per stage when
      every stage is on its own machine (address), else 1 — stages sharing a machine share its cores, and there
      splitting only shrinks each GEMM (measured: 0.64× the throughput of 8 sequences on one 2-core machine).
    timeout_s: longest a load may take, and the longest any step may take (unless step_timeout.ceiling_s).
    step_timeout: when a step's busy shards are probed for a hang (runtime/step_timeout.py; default StepTimeout()).
    reuse: live shards of a failed executor (its `detach_survivors()`) to take over where they fit.
    lookahead: with the step loops, send the next decode steps before the engine asks for them
      (runtime/lookahead.py `lookahead_depth`: two, the second fed on the shards, or one for tensor parallelism
      alone); None: as OLLAMA_DISTRIBUTED_LOOKAHEAD says (default auto; 2, 1 or 0 force that many).
    """

    def __init__(
        self,
        plan: Any,
        model_path: str | Path,
        cluster: ClusterHandle,
        dtype: torch.dtype = torch.float32,
        max_seq_len: int | None = None,
        transport: str = "dist",
        micro_batches: int | None = None,
        timeout_s: float = 300.0,
        step_timeout: StepTimeout | None = None,
        reuse: Sequence[LiveShard] = (),
        quant: str | None = None,
        kv_cache_type: str | None = None,
        lookahead: bool | None = None,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .worker import ShardWorker

        if transport not in ("dist", "calls", "ray"):
            raise ValueError(f"transport must be 'dist', 'calls' or 'ray', got {transport!r}")
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
        if quant is not None and quant not in QUANT_FORMATS:
            raise ValueError(f"quant must be one of {QUANT_FORMATS}, got {quant!r}")
        self.model_path = Path(model_path)
        self.config = read_config(self.model_path)
        limit = self.config.context_length
        self.max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN) if max_seq_len is None else int(max_seq_len)
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.transport = transport
        self.timeout_s = timeout_s
        self.step_timeout = step_timeout or StepTimeout()
        self._ceiling_s = self.step_timeout.ceiling_s or timeout_s
        self.timer = StepTimer(self.step_timeout)
        self.probe_rounds = 0  # times busy shards were probed (a step outlived its deadline)
        self.cluster = cluster
        self._dtype_name = weight_format_name(str(dtype), quant)  # a model/formats.py weight-format name
        self._kv_cache_type = kv_cache_type
        self._plan = plan_dict(plan)
        self.stages: list[list[ShardPlacement]] = place(self._plan, self.config, cluster)
        self._flat = [p for row in self.stages for p in row]
        self.micro_batches = micro_batches if micro_batches is not None else self._auto_micro_batches(cluster)
        self._lengths: dict[int, int] = {}
        self._decode_stage_ms: list[float] | None = None
        self._broken: str | None = None
        self._closed = False
        self._infos: list[dict[str, Any]] = []
        self._last_refs: list[Any] = []
        self._hung: set[int] = set()
        self.shm_paths: list[dict[str, int]] = []  # per shard: hops and sums over shared memory (worker.setup_comm)
        self._loops: StepLoops | None = None  # the "dist" transport's step channels (step_loop.py)
        self._installed: dict[int, int] = {}  # seq id -> id() of the Sampler its last stage holds (step_sampled)
        if lookahead is None:
            setting = os.environ.get("OLLAMA_DISTRIBUTED_LOOKAHEAD", "auto")
        else:
            setting = "auto" if lookahead else "0"
        depth = lookahead_depth(setting, [len(row) for row in self.stages])
        self.lookahead = depth > 0
        # decode steps sent ahead (runtime/lookahead.py): a second one is fed on the shards with what the first
        # samples (the output rank sends it to stage 0, collectives.py send_feed), with no relay by the driver
        self._aheads = Lookaheads(self._post, self._collect_next, self._lengths, self._installed, self.max_seq_len,
                                  depth=max(1, depth))
        self._pending: deque[tuple[int | None, Lookahead | None, float]] = deque()  # (tokens, ahead, sent at)
        self._last_reply = 0.0  # when the last reply was collected (a step sent ahead starts after it)
        nodes = cluster.nodes()
        cpus = {n.name: n.cpus for n in nodes}
        self._address = {n.name: n.address for n in nodes}

        # Take over live shards of a failed executor where they fit; kill the rest first, so that the memory
        # they reserve on their nodes is free for the shards started below.
        self._reused: dict[int, LiveShard] = {}
        spare = list(reuse)
        for i, p in enumerate(self._flat):
            live = next((r for r in spare if r.fits(p, str(self.model_path), self._dtype_name, self._kv_cache_type, self.max_seq_len)), None)
            if live is not None:
                spare.remove(live)
                self._reused[i] = live
        for r in spare:
            _kill_actor(r.actor, r.pid, local=r.local)
        # A threaded actor with one extra thread for liveness probes; its default group still runs one call at
        # a time, in order.
        remote_cls = ray.remote(concurrency_groups={_HEALTH: 1, LOOP_GROUP: 1})(ShardWorker)
        self._workers = [
            self._reused[i].actor if i in self._reused else
            remote_cls.options(
                num_cpus=0,  # placed by node affinity; the node's CPUs bound its threads instead
                num_gpus=p.gpus,
                resources=dict(p.resources or {}),
                scheduling_strategy=NodeAffinitySchedulingStrategy(p.node_id, soft=False),
                max_restarts=0,
            ).remote(max(1, int(cpus.get(p.node, 1))))
            for i, p in enumerate(self._flat)
        ]
        try:
            self._start(self._dtype_name)
        except BaseException:
            self.close()
            raise
        self._out = next(i for i, p in enumerate(self._flat) if p.spec.has_output)
        log.info(
            "RayExecutor: %d stage(s) × %s shard(s) on %s, transport %s",
            len(self.stages), [len(s) for s in self.stages], [p.node for p in self._flat], transport,
        )

    def _auto_micro_batches(self, cluster: ClusterHandle) -> int:
        addr = {n.name: n.address for n in cluster.nodes()}
        hosts = [{addr[p.node] for p in row} for row in self.stages]
        separate = all(not (a & b) for i, a in enumerate(hosts) for b in hosts[i + 1 :])
        return len(self.stages) if separate and len(self.stages) > 1 else 1

    def _start(self, dtype_name: str) -> None:
        import ray

        t0 = time.perf_counter()
        holder = self._weight_holder()
        loads = [
            w.info.remote() if i in self._reused else
            w.load.remote(
                str(self.model_path),
                {"layers": p.spec.layers, "kv_heads": p.spec.kv_heads, "ffn": p.spec.ffn, "experts": p.spec.experts,
                 "has_embedding": p.spec.has_embedding, "has_output": p.spec.has_output},
                dtype_name,
                self.max_seq_len,
                self._kv_cache_type,
                holder,
            )
            for i, (w, p) in enumerate(zip(self._workers, self._flat))
        ]
        pending = self._wait_loads(loads, holder)
        if pending:
            names = [self._flat[loads.index(r)].node for r in pending]
            raise PlacementError(
                f"shard(s) on {', '.join(names)} did not start within {self.timeout_s:.0f} s: the node lacks the "
                f"reserved memory ({[self._flat[loads.index(r)].resources for r in pending]}) or is gone"
            )
        self._infos = ray.get(loads)
        for info, p in zip(self._infos, self._flat):
            if info["node_id"] != p.node_id:  # NodeAffinity(soft=False) should make this impossible
                raise PlacementError(f"shard for {p.node} ({p.node_id}) started on node {info['node_id']}")
        backend = "nccl" if all(i["device"].startswith("cuda") for i in self._infos) else "gloo"
        master, port = ray.get(self._workers[0].free_port.remote())
        shm, made = self._shared_memory_paths(backend)
        try:
            self.shm_paths = ray.get(
                [w.setup_comm.remote(p.layout, master, port, backend, self.timeout_s, shm.get(p.rank))
                 for w, p in zip(self._workers, self._flat)],
                timeout=self.timeout_s,
            )
        finally:
            for seg in made:  # every rank has attached (or failed): nothing is left in /dev/shm
                seg.unlink()
                seg.detach()
        self.backend = backend
        self.start_s = time.perf_counter() - t0
        log.info("RayExecutor: shards loaded and connected (%s) in %.1f s, %d of %d reused", backend, self.start_s,
                 len(self._reused), len(self._flat))
        if self.transport == "dist":
            self._loops = StepLoops(self._workers, self._infos, self.timeout_s)

    def _shared_memory_paths(self, backend: str) -> tuple[dict[int, dict[str, Any]], list[Any]]:
        """Per rank, the shared-memory hops, token feeds and sums among shards on one host (runtime/shm_comm.py;
        each rank's collectives.PlanComm then bypasses gloo there), and the rings and segments made for them. Only
        for a gloo world of CPU shards; OLLAMA_DISTRIBUTED_SHM_COMM=0 keeps every path on gloo (for measuring)."""
        from .shm_comm import ShmAllReduce, colocated, create_feed, create_hop, shm_for_colocated

        if (backend != "gloo" or not shm_for_colocated()
                or any(not str(i.get("device", "cpu")).startswith("cpu") for i in self._infos)):
            return {}, []
        hosts = [(i.get("ip"), i.get("host")) for i in self._infos]
        pids = [int(i["pid"]) for i in self._infos]
        layouts = [p.layout for p in self._flat]
        edges, stages, feeds = colocated(layouts[0].stage_ranks, {lay.rank: lay.send_to for lay in layouts}, hosts)
        out: dict[int, dict[str, Any]] = {}
        made: list[Any] = []

        def entry(rank: int) -> dict[str, Any]:
            return out.setdefault(rank, {"peers": {}, "send": {}, "recv": None, "feed_send": {}, "feed_recv": None,
                                         "reduce": None})

        try:
            for src, dst in edges:
                ring = create_hop()
                made.append(ring)
                entry(src)["send"][dst] = entry(dst)["recv"] = ring.spec()
                entry(src)["peers"][dst], entry(dst)["peers"][src] = pids[dst], pids[src]
            for src, dst in feeds:
                ring = create_feed()
                made.append(ring)
                entry(src)["feed_send"][dst] = entry(dst)["feed_recv"] = ring.spec()
                entry(src)["peers"][dst], entry(dst)["peers"][src] = pids[dst], pids[src]
            for st in stages:
                members = layouts[0].stage_ranks[st]
                seg = ShmAllReduce.create(len(members))
                made.append(seg)
                for r in members:
                    entry(r)["reduce"] = seg.spec()
                    entry(r)["peers"].update({q: pids[q] for q in members if q != r})
        except BaseException:
            for seg in made:
                seg.unlink()
                seg.detach()
            raise
        return out, made

    def _wait_loads(self, loads: list[Any], holder: Any) -> list[Any]:
        """Wait for the shards' loads; returns those still pending after the time-out. While nodes fetch weight
        slices (holder given) their progress goes to the log, and the time-out restarts whenever bytes arrive: a
        30 GB slice over a slow link may take longer than any fixed bound, and is not a hung load."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        pending, seen = list(loads), -1
        while pending and time.monotonic() < deadline:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0 if holder is not None else
                                  max(0.0, deadline - time.monotonic()))
            if holder is None or not pending:
                continue
            actor = getattr(holder, "holder", holder)  # weight_fetch.Peered wraps the holder with its peers
            rows = [r for r in ray.get(actor.progress.remote()) if r["model"] == self.model_path.name]
            done = sum(r["bytes_done"] for r in rows)
            if done > seen:
                deadline, seen = time.monotonic() + self.timeout_s, done
            for r in rows:
                if r["state"] == "fetching":
                    log.info("weights: node %s fetching %s: %.0f of %.0f MB at %.0f MB/s, ETA %.0f s", r["node"],
                             r["model"], r["bytes_done"] / 1e6, r["bytes_total"] / 1e6, r["bytes_per_s"] / 1e6,
                             r["eta_s"])
        return pending

    def _weight_holder(self) -> Any:
        """The cluster's WeightHolder (runtime/weight_fetch.py) when a new shard's node lacks the model file, else
        None (asked of the workers themselves: a path may exist on one machine and not on another)."""
        import ray

        fresh = [i for i in range(len(self._workers)) if i not in self._reused]
        if not fresh or self.model_path.is_dir():  # HF directories are not fetched: they must be on every node
            return None
        have = ray.get([self._workers[i].has_file.remote(str(self.model_path)) for i in fresh], timeout=self.timeout_s)
        if all(have):
            return None
        from .weight_fetch import CHUNK_BYTES, holder_actor, slice_bytes, with_peers

        chunk = int(os.environ.get("OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES", CHUNK_BYTES))
        for i, ok in zip(fresh, have):
            if not ok:
                spec = self._flat[i].spec
                need = slice_bytes(self.model_path, spec.layers, spec.has_embedding, spec.has_output, spec.experts, chunk)
                log.info("RayExecutor: node %s lacks %s: its shard (layers [%d, %d)) fetches %.2f GB from this node "
                         "first (less what its slice cache holds)", self._flat[i].node, self.model_path.name,
                         *spec.layers, need / 1e9)
        # nodes whose slice caches hold chunks of the file serve them too (weight_fetch.py SlicePeer)
        lacking = [self._flat[i].node for i, ok in zip(fresh, have) if not ok]
        return with_peers(holder_actor(), self.model_path, self.cluster, lacking)

    # ---- Executor protocol ------------------------------------------------------------------------------------
    def step(self, seq_ids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        self._check_usable()
        self._aheads.drop()  # logits were asked for: what was sent ahead is rewound, not reused
        counts = self._check_step(seq_ids, tokens)
        x = self._token_tensor([t for ts in tokens for t in ts])
        t0 = time.perf_counter()
        logits = self._run(seq_ids, counts, x, "logits")
        self.timer.record(sum(counts), time.perf_counter() - t0)
        for sid, n in zip(seq_ids, counts):
            self._lengths[sid] = self._lengths.get(sid, 0) + n
        return logits

    def embed(self, tokens: list[int]) -> torch.Tensor:
        self._check_usable()
        if not tokens:
            raise ValueError("embed: no tokens")
        if len(tokens) > self.max_seq_len:
            raise CacheFullError(f"embed: {len(tokens)} tokens exceed max_seq_len {self.max_seq_len}")
        try:
            hidden = self._run([_EMBED_SEQ], [len(tokens)], self._token_tensor(tokens), "hidden")
        finally:
            if self._broken is None:
                self._free_all([_EMBED_SEQ])
        return hidden.mean(dim=0)

    def free(self, seq_id: int) -> None:
        self._check_usable()
        self._lengths.pop(seq_id, None)
        self._installed.pop(seq_id, None)
        self._aheads.freed(seq_id)
        self._free_all([seq_id], wait=False)

    def close(self) -> None:
        """Destroy the process groups, then kill every actor (which ends its process)."""
        if self._closed:
            return
        self._closed = True
        import ray

        workers = [w for w in getattr(self, "_workers", []) if w is not None]
        loops = getattr(self, "_loops", None)
        if loops is not None and self._broken is None:
            loops.stop([i for i, w in enumerate(self._workers) if w is not None], grace_s=5.0)
        if loops is not None:
            loops.close()
            self._loops = None
        self._workers = []
        if workers and self._broken is None:
            ray.wait([w.close.remote() for w in workers], num_returns=len(workers), timeout=10)
        for w in workers:
            _kill_actor(w, None, local=False)

    def detach_survivors(self, grace_s: float = 2.0) -> list[LiveShard]:
        """After a failure: the shards that are alive and idle, reset (cache and process groups dropped, weights
        kept) and detached from this executor, for the next one's `reuse=`; `close()` then kills only the rest.

        A shard qualifies when its last call ended (with a result or an error; a shard still waiting in a recv
        for a lost peer after `grace_s` does not) and its reset answers within `grace_s`."""
        import ray

        if self._closed or not self._workers:
            return []
        if self._broken is None:
            self._broken = "its shards were detached for reuse"
        candidates = [i for i in range(len(self._workers)) if i not in self._hung and self._workers[i] is not None]
        if self._loops is not None:
            # idle = its loop read the stop (a loop still in a step, waiting for a lost peer, does not)
            idle = self._loops.stop(candidates, grace_s)
            candidates = [i for i in candidates if i in idle]
            self._loops.close()
            self._loops = None
        last = self._last_refs if len(self._last_refs) == len(self._workers) and self._loops is None else []
        if last and candidates:
            ray.wait([last[i] for i in candidates], num_returns=len(candidates), timeout=grace_s)
            done = set()
            for i in candidates:
                ready, _ = ray.wait([last[i]], timeout=0)
                if not ready:
                    continue
                try:
                    ray.get(ready[0])
                except ray.exceptions.RayActorError:
                    continue  # the actor is dead
                except Exception:  # noqa: BLE001 - a step that failed because of a peer: the shard lives
                    pass
                done.add(i)
            candidates = [i for i in candidates if i in done]
        resets = {i: self._workers[i].reset.remote() for i in candidates}
        if resets:
            ray.wait(list(resets.values()), num_returns=len(resets), timeout=grace_s)
        out: list[LiveShard] = []
        for i, ref in resets.items():
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - not answering, or failed: not reusable
                continue
            p, info = self._flat[i], self._infos[i] if i < len(self._infos) else {}
            out.append(LiveShard(self._workers[i], p.node_id, p.spec, tuple(sorted((p.resources or {}).items())),
                                 p.gpus, str(self.model_path), self._dtype_name, self._kv_cache_type, self.max_seq_len,
                                 info.get("pid"),
                                 self._address.get(p.node) in _LOCAL_ADDRESSES))
            self._workers[i] = None
        log.info("detached %d live shard(s) of %d for reuse", len(out), len(self._flat))
        return out

    # ---- introspection ----------------------------------------------------------------------------------------
    @property
    def lookahead_taken(self) -> int:
        """Rows whose result came from a step sent ahead (runtime/lookahead.py)."""
        return self._aheads.taken

    @property
    def lookahead_rewound(self) -> int:
        """Rows sent ahead that the engine fed otherwise (rewound on the shards)."""
        return self._aheads.rewound

    @property
    def reused_shards(self) -> int:
        """Shards taken over from a failed executor instead of started (see `reuse`)."""
        return len(self._reused)

    def placement(self) -> dict[str, Any]:
        """The plan JSON, each shard with the Ray node id and pid it actually runs under (reported by the actor)."""
        out = plan_dict(self._plan)
        out = {**out, "stages": [dict(st, shards=[dict(sh) for sh in st["shards"]]) for st in out["stages"]]}
        for p, info in zip(self._flat, self._infos):
            sh = out["stages"][p.stage]["shards"][p.index]
            sh["node_id"] = info["node_id"]
            sh["pid"] = info["pid"]
            if info.get("weights_from") and info["weights_from"]["slice_bytes"]:  # the node fetched its slice
                sh["weights_fetched"] = info["weights_from"]
        return out

    def shard_info(self) -> list[dict[str, Any]]:
        """Live per-shard facts asked of each actor: node id, pid, RSS, weight and cache bytes, cached sequences."""
        self._check_usable()
        self._drain()  # frees sent without waiting are done before the shards are asked
        infos = self._call_all("info")
        return [dict(i, stage=p.stage, index=p.index, node=p.node) for i, p in zip(infos, self._flat)]

    def cached_sequences(self) -> set[int]:
        self._drain()
        return {sid for info in self._call_all("info") for sid in info["cached_seqs"]}

    # ---- internals --------------------------------------------------------------------------------------------
    def _run(self, seq_ids: list[int], counts: list[int], x: torch.Tensor, output: str) -> torch.Tensor:
        if self.transport == "dist":
            out = self._loop_step(seq_ids, counts, x, output, None)
            return out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
        if self.transport == "calls":  # the data path before issue 15: one Ray call per worker per step
            m = self.micro_batches if len(self.stages) > 1 else 1
            refs = [w.step.remote(seq_ids, counts, x if p.stage == 0 else None, output, m)
                    for w, p in zip(self._workers, self._flat)]
            results = self._get(refs, sum(counts))
            if max(counts) == 1:
                self._note_decode_stages([ms for _, ms in results])
            return results[self._out][0]
        refs, feed = [], x
        for row in self.stages:
            stage_refs = [self._workers[p.rank].step_ray.remote(seq_ids, counts, feed, output) for p in row]
            refs += stage_refs
            feed = stage_refs[0]  # every shard of a stage ends with the same residual stream
        return self._get(refs, sum(counts))[self._out]

    def _loop_step(self, seq_ids: list[int], counts: list[int], x: torch.Tensor, output: str,
                   sample: list[Any] | None) -> Any:
        """One step through the step loops: one message to every shard, one reply from every shard; returns the
        output shard's payload (logits / hidden states as an ndarray, or sampled tokens, worker.py `_sample`)."""
        m = self.micro_batches if len(self.stages) > 1 else 1
        msg = pickle.dumps(("step", seq_ids, counts, x.tolist(), output, m, sample), protocol=pickle.HIGHEST_PROTOCOL)
        replies = self._exchange(msg, sum(counts))
        if max(counts) == 1:
            self._note_decode_stages([r[2] for r in replies])
        return replies[self._out][1]

    def _free_all(self, seq_ids: list[int], wait: bool = True) -> None:
        if self._loops is None:
            self._call_all("free", seq_ids)
            return
        msg = pickle.dumps(("free", seq_ids))
        if wait:
            self._exchange(msg, None)
        else:  # answered on the ordered channel; the reply is collected with the next exchange
            self._post(msg, None)

    def _exchange(self, msg: bytes, tokens: int | None) -> list[Any]:
        """Send `msg` to every shard's loop and wait for each one's reply (and first for the replies to messages
        sent before it); failures as in `_get`."""
        self._post(msg, tokens)
        while True:
            replies = self._collect_next()
            if not self._pending:
                return replies

    def _drain(self) -> None:
        while self._loops is not None and self._pending:
            self._collect_next()

    def _post(self, msg: bytes, tokens: int | None, ahead: Lookahead | None = None) -> None:
        """Send `msg` to every shard's loop; its replies are collected in order by `_collect_next`."""
        while len(self._pending) >= _MAX_IN_FLIGHT:
            self._collect_next()
        try:
            self._loops.send(msg)
        except ChannelClosed as exc:
            self._pending.clear()
            self._broken = self._describe_failure([], exc)
            raise ExecutorError(self._broken) from exc
        self._pending.append((tokens, ahead, time.perf_counter()))

    def _collect_next(self) -> list[Any]:
        """Every shard's reply to the oldest message not yet answered (a step sent ahead keeps its result)."""
        tokens, ahead, sent = self._pending.popleft()
        try:
            interval = self.timer.deadline(tokens) if tokens else self.step_timeout.floor_s
            replies = self._loops.collect(lambda busy, waited: self._check_busy(busy, waited, tokens), interval,
                                          self._ceiling_s)
        except ShardLostError as exc:
            self._pending.clear()
            self._broken = str(exc)
            raise
        except StepTimeoutError as exc:
            self._pending.clear()
            self._broken = f"a step did not finish within {self._ceiling_s:.0f} s"
            raise ExecutorError(self._broken) from exc
        except (LoopEnded, ChannelClosed) as exc:
            self._pending.clear()
            self._broken = self._describe_failure([], getattr(exc, "cause", None) or exc)
            raise ExecutorError(self._broken) from exc
        errors = [(i, r[1]) for i, r in enumerate(replies) if r[0] != "ok"]
        if errors:
            # a shard failing mid-step leaves its peers in a recv/all-reduce: the plan is unusable
            self._pending.clear()
            i, why = errors[0]
            self._broken = f"a shard failed (stage {self._flat[i].stage} shard {self._flat[i].index}): {why}"
            raise ExecutorError(self._broken)
        now = time.perf_counter()
        if ahead is not None:  # queued behind the step before it: its own time starts at that one's reply
            self.timer.record(len(ahead.seq_ids), now - max(sent, self._last_reply))
            self._note_decode_stages([r[2] for r in replies])
            ahead.out = replies[self._out][1]
        self._last_reply = now
        return replies

    def step_sampled(self, seq_ids: list[int], tokens: list[list[int]], samplers: Sequence[Any],
                     histories: Sequence[Sequence[int] | None]) -> list[int | None]:
        """`step`, sampling on the last stage: feeds each sequence its tokens and returns, for every i with
        samplers[i] not None, the token samplers[i] draws from row i's logits (None elsewhere), as
        `samplers[i].sample(logits[i], histories[i])` would here — the vocabulary's logits stay on the shard.

        The shard keeps a copy of each sequence's Sampler (sent once, model/sampling.py Samplers pickle with
        their generator), and returns the generator state after each non-greedy draw, copied into samplers[i],
        so the engine's sampler stays in step and a replay onto a new executor continues its random stream.
        A grammar constraint (model/sampling.py TokenConstraint; it pickles with the tokens it consumed) masks and
        advances on the shard; the driver's copy advances by the returned token, so the copy a replay re-sends is
        current. Logprobs, when asked, come back with the token. With transport "ray" this samples in the driver.

        With `lookahead`, the next decode step of these rows is sent before this returns (runtime/lookahead.py),
        and rows of the next call that it covers take its result."""
        self._check_usable()
        if len(samplers) != len(seq_ids) or len(histories) != len(seq_ids):
            raise ValueError(f"step_sampled: {len(seq_ids)} seq_ids, {len(samplers)} samplers, {len(histories)} histories")
        if self._loops is None:
            logits = self.step(seq_ids, tokens)
            return [None if s is None else s.sample(logits[i], histories[i] or ()) for i, s in enumerate(samplers)]
        out: list[int | None] = [None] * len(seq_ids)
        ahead, taken = self._aheads.take(seq_ids, tokens, samplers)
        rest = [i for i in range(len(seq_ids)) if i not in taken]
        if rest:
            pick = lambda xs: [xs[i] for i in rest]  # noqa: E731
            payload = self._sampled_step(pick(seq_ids), pick(tokens), pick(samplers), pick(histories))
            apply_sampled(payload, {i: j for j, i in enumerate(rest)}, samplers, out)
        if taken:
            apply_sampled(ahead.out, taken, samplers, out)
        if self.lookahead:
            self._aheads.send(seq_ids, samplers, histories, out, self.micro_batches if len(self.stages) > 1 else 1)
        return out

    def _sampled_step(self, seq_ids: list[int], tokens: list[list[int]], samplers: Sequence[Any],
                      histories: Sequence[Sequence[int] | None]) -> dict[str, Any]:
        entries = sample_entries(self._installed, seq_ids, samplers, histories)
        counts = self._check_step(seq_ids, tokens)
        x = self._token_tensor([t for ts in tokens for t in ts])
        t0 = time.perf_counter()
        try:
            payload = self._loop_step(seq_ids, counts, x, "logits", entries)
        except BaseException:
            self._installed.clear()
            raise
        self.timer.record(sum(counts), time.perf_counter() - t0)
        for sid, n in zip(seq_ids, counts):
            self._lengths[sid] = self._lengths.get(sid, 0) + n
        return payload

    def _check_step(self, seq_ids: list[int], tokens: list[list[int]]) -> list[int]:
        if len(seq_ids) != len(tokens):
            raise ValueError(f"step: {len(seq_ids)} seq_ids but {len(tokens)} token lists")
        counts = [len(t) for t in tokens]
        if not counts or min(counts) < 1:
            raise ValueError(f"step: every sequence needs at least one token, got counts {counts}")
        for sid, n in zip(seq_ids, counts):
            have = self._lengths.get(sid, 0)
            if have + n > self.max_seq_len:
                raise CacheFullError(f"sequence {sid}: {have} cached + {n} new tokens exceeds max_seq_len {self.max_seq_len}")
        return counts

    def _note_decode_stages(self, forward_ms: list[float]) -> None:
        """EMA (weight 0.2, as the step timer's) of each stage's time in a decode step: the slowest shard's
        forward of the stage, since its tensor-parallel peers wait for it in the all-reduce."""
        now = [max(forward_ms[p.rank] for p in row) for row in self.stages]
        prev = self._decode_stage_ms
        self._decode_stage_ms = now if prev is None else [0.8 * a + 0.2 * b for a, b in zip(prev, now)]

    def decode_stage_ms(self) -> tuple[float, ...] | None:
        """Measured per-stage time of a decode step (stage order; None before the first decode step or with the
        "ray" transport), for the learning loop's StepTimings.stage_ms."""
        return tuple(self._decode_stage_ms) if self._decode_stage_ms else None

    def _token_tensor(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor(ids, dtype=torch.int64)
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size}): min {lo}, max {hi}")
        return x

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        return self._get([getattr(w, method).remote(*args) for w in self._workers])

    def _get(self, refs: list, tokens: int | None = None) -> list[Any]:
        """Results of one call per worker (refs[i] is worker i's); `tokens`: the step's size, for its deadline."""
        import ray

        assert len(refs) == len(self._workers), (len(refs), len(self._workers))
        self._last_refs = list(refs)
        try:
            # Wait shard by shard so the first failure surfaces at once: when one shard dies its peers sit in a
            # recv until the gloo timeout, and a plain ray.get(refs) would wait for them too. At each adaptive
            # deadline the busy shards are probed (step_timeout.py); the ceiling bounds the whole wait.
            t0 = time.monotonic()
            ceiling = t0 + self._ceiling_s
            interval = self.timer.deadline(tokens) if tokens else self.step_timeout.floor_s
            deadline = t0 + interval
            pending = list(refs)
            while pending:
                now = time.monotonic()
                if now >= ceiling:
                    raise ray.exceptions.GetTimeoutError(f"no result within {self._ceiling_s:.0f} s")
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(min(deadline, ceiling) - now, 0.0))
                if ready:
                    ray.get(ready)  # raises the shard's error, if any
                    continue
                if time.monotonic() < ceiling:
                    self._check_busy([refs.index(r) for r in pending], time.monotonic() - t0, tokens)
                    deadline = time.monotonic() + interval
            return ray.get(refs)
        except ShardLostError as exc:
            self._broken = str(exc)
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            self._broken = self._describe_failure(refs, exc)
            raise ExecutorError(self._broken) from exc
        except ray.exceptions.RayTaskError as exc:
            # Any shard failing mid-step leaves its peers waiting in a recv/all-reduce: the plan is unusable.
            # (Bad requests are rejected in the driver before anything is sent, see step().)
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            self._broken = f"a shard failed: {type(cause).__name__}: {cause}"
            raise ExecutorError(self._broken) from exc

    def _check_busy(self, busy: list[int], waited_s: float, tokens: int | None) -> None:
        """Probe the shards whose call is still running; kill those that do not answer and raise
        ShardLostError naming them. Returns when every busy shard answered (the step is merely slow)."""
        import ray

        self.probe_rounds += 1
        probes = [self._workers[i].ping.options(concurrency_group=_HEALTH).remote() for i in busy]
        t0 = time.perf_counter()
        _, silent = ray.wait(probes, num_returns=len(probes), timeout=self.step_timeout.probe_s)
        hung = [i for i, ref in zip(busy, probes) if ref in silent]
        if not hung:
            log.info("step of %s tokens still running after %.1f s; every busy shard answered its probe in %.2f s",
                     tokens, waited_s, time.perf_counter() - t0)
            return
        self._hung.update(hung)
        exp = self.timer.expected(tokens) if tokens else None
        what = []
        for i in hung:
            p = self._flat[i]
            pid = self._infos[i].get("pid") if i < len(self._infos) else None
            what.append(f"stage {p.stage} shard {p.index} on node {p.node} (pid {pid})")
            _kill_actor(self._workers[i], pid, local=self._address.get(p.node) in _LOCAL_ADDRESSES)
        expected = f"{exp * 1e3:.0f} ms expected" if exp is not None else "nothing measured yet"
        raise ShardLostError(
            f"lost {'; '.join(what)}: hung — its step of {tokens} token(s) ran {waited_s:.1f} s ({expected}) and "
            f"it did not answer a liveness probe within {self.step_timeout.probe_s:.1f} s; killed",
            tuple(dict.fromkeys(self._flat[i].node for i in hung)),
        )

    def _describe_failure(self, refs: list, exc: Exception) -> str:
        import ray

        dead = []
        alive = {n.node_id for n in self.cluster.nodes()}
        for p in self._flat:
            if p.node_id not in alive:
                dead.append(f"stage {p.stage} shard {p.index} on node {p.node} (node is gone)")
        if dead:
            return "lost " + "; ".join(dead)
        if isinstance(exc, ray.exceptions.GetTimeoutError):
            return f"a step did not finish within {self.timeout_s:.0f} s"
        return f"a shard actor died: {exc}"

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the executor is closed")
        if self._broken is not None:
            raise ExecutorError(f"the executor is broken ({self._broken}); close it and build a new one")


def _kill_actor(actor: Any, pid: int | None, local: bool) -> None:
    """ray.kill the actor; a local process that Ray cannot reach (stopped) is SIGKILLed as well, so that its
    memory and its node's reserved resources are freed now rather than after Ray's own kill time-out."""
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - already dead
        log.debug("kill: %s", exc)
    if local and pid is not None and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
