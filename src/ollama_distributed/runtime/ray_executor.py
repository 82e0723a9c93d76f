"""`RayExecutor`: runs a PartitionPlan on a Ray cluster — one ShardWorker actor per shard, pinned to the node the
plan names — and satisfies the engine's Executor protocol (runtime/executor.py).

Lifecycle: check the plan (placement.py) → start the actors with NodeAffinitySchedulingStrategy(soft=False) and
the plan's memory reserved from the node's `od_memory_mib` budget → each loads its slice from the model file on
its node → all join one torch.distributed world (gloo; NCCL when every shard has a GPU), built once per plan.
`step` then costs one Ray call per worker and one result: activations move stage to stage over torch.distributed
(see worker.py). `transport="ray"` instead chains the stages through Ray object refs (kept for the benchmark).

Failure: a dead actor or node surfaces as ExecutorError naming the shard and node; the executor is then broken
(its other shards may sit in a recv) and must be closed and rebuilt — the engine replays sequences onto a new one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..model.weights import read_config
from .cluster import ClusterHandle
from .executor import CacheFullError, ExecutorError
from .placement import PlacementError, ShardPlacement, place, plan_dict

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 8192
_EMBED_SEQ = -1  # engine sequence ids are >= 0; embeddings borrow this one for a single step and free it
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class RayExecutor:
    """Executor over the shards of `plan` on `cluster` (see module docstring).

    plan: a PartitionPlan or its JSON dict. model_path: GGUF file (or HF dir) present at this path on every node.
    dtype: compute dtype of weights and KV cache. max_seq_len: KV-cache bound per sequence (default
    min(context, 8192)). transport: "dist" (torch.distributed between stages) or "ray" (object refs per hop).
    micro_batches: pieces a multi-sequence batch is split into so pipeline stages overlap. None: one per stage when
      every stage is on its own machine (address), else 1 — stages sharing a machine share its cores, and there
      splitting only shrinks each GEMM (measured: 0.64× the throughput of 8 sequences on one 2-core machine).
    timeout_s: longest a load or a step may take before it is declared failed.
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
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .worker import ShardWorker

        if transport not in ("dist", "ray"):
            raise ValueError(f"transport must be 'dist' or 'ray', got {transport!r}")
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
        self.model_path = Path(model_path)
        self.config = read_config(self.model_path)
        limit = self.config.context_length
        self.max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN) if max_seq_len is None else int(max_seq_len)
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.transport = transport
        self.timeout_s = timeout_s
        self.cluster = cluster
        self._plan = plan_dict(plan)
        self.stages: list[list[ShardPlacement]] = place(self._plan, self.config, cluster)
        self._flat = [p for row in self.stages for p in row]
        self.micro_batches = micro_batches if micro_batches is not None else self._auto_micro_batches(cluster)
        self._lengths: dict[int, int] = {}
        self._broken: str | None = None
        self._closed = False
        self._infos: list[dict[str, Any]] = []
        cpus = {n.name: n.cpus for n in cluster.nodes()}

        remote_cls = ray.remote(ShardWorker)
        self._workers = [
            remote_cls.options(
                num_cpus=0,  # placed by node affinity; the node's CPUs bound its threads instead
                num_gpus=p.gpus,
                resources=dict(p.resources or {}),
                scheduling_strategy=NodeAffinitySchedulingStrategy(p.node_id, soft=False),
                max_restarts=0,
            ).remote(max(1, int(cpus.get(p.node, 1))))
            for p in self._flat
        ]
        try:
            self._start(_DTYPE_NAMES[dtype])
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
        loads = [
            w.load.remote(
                str(self.model_path),
                {"layers": p.spec.layers, "kv_heads": p.spec.kv_heads, "ffn": p.spec.ffn,
                 "has_embedding": p.spec.has_embedding, "has_output": p.spec.has_output},
                dtype_name,
                self.max_seq_len,
            )
            for w, p in zip(self._workers, self._flat)
        ]
        ready, pending = ray.wait(loads, num_returns=len(loads), timeout=self.timeout_s)
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
        ray.get(
            [w.setup_comm.remote(p.layout, master, port, backend, self.timeout_s) for w, p in zip(self._workers, self._flat)],
            timeout=self.timeout_s,
        )
        self.backend = backend
        log.info("RayExecutor: shards loaded and connected (%s) in %.1f s", backend, time.perf_counter() - t0)

    # ---- Executor protocol ------------------------------------------------------------------------------------
    def step(self, seq_ids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        self._check_usable()
        if len(seq_ids) != len(tokens):
            raise ValueError(f"step: {len(seq_ids)} seq_ids but {len(tokens)} token lists")
        counts = [len(t) for t in tokens]
        if not counts or min(counts) < 1:
            raise ValueError(f"step: every sequence needs at least one token, got counts {counts}")
        for sid, n in zip(seq_ids, counts):
            have = self._lengths.get(sid, 0)
            if have + n > self.max_seq_len:
                raise CacheFullError(f"sequence {sid}: {have} cached + {n} new tokens exceeds max_seq_len {self.max_seq_len}")
        x = self._token_tensor([t for ts in tokens for t in ts])
        logits = self._run(seq_ids, counts, x, "logits")
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
                self._call_all("free", [_EMBED_SEQ])
        return hidden.mean(dim=0)

    def free(self, seq_id: int) -> None:
        self._check_usable()
        self._lengths.pop(seq_id, None)
        self._call_all("free", [seq_id])

    def close(self) -> None:
        """Destroy the process groups, then kill every actor (which ends its process)."""
        if self._closed:
            return
        self._closed = True
        import ray

        workers, self._workers = getattr(self, "_workers", []), []
        if workers and self._broken is None:
            ray.wait([w.close.remote() for w in workers], num_returns=len(workers), timeout=10)
        for w in workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception as exc:  # already dead
                log.debug("kill: %s", exc)

    # ---- introspection ----------------------------------------------------------------------------------------
    def placement(self) -> dict[str, Any]:
        """The plan JSON, each shard with the Ray node id and pid it actually runs under (reported by the actor)."""
        out = plan_dict(self._plan)
        out = {**out, "stages": [dict(st, shards=[dict(sh) for sh in st["shards"]]) for st in out["stages"]]}
        for p, info in zip(self._flat, self._infos):
            sh = out["stages"][p.stage]["shards"][p.index]
            sh["node_id"] = info["node_id"]
            sh["pid"] = info["pid"]
        return out

    def shard_info(self) -> list[dict[str, Any]]:
        """Live per-shard facts asked of each actor: node id, pid, RSS, weight and cache bytes, cached sequences."""
        self._check_usable()
        infos = self._call_all("info")
        return [dict(i, stage=p.stage, index=p.index, node=p.node) for i, p in zip(infos, self._flat)]

    def cached_sequences(self) -> set[int]:
        return {sid for info in self._call_all("info") for sid in info["cached_seqs"]}

    # ---- internals --------------------------------------------------------------------------------------------
    def _run(self, seq_ids: list[int], counts: list[int], x: torch.Tensor, output: str) -> torch.Tensor:
        if self.transport == "dist":
            m = self.micro_batches if len(self.stages) > 1 else 1
            refs = [
                w.step.remote(seq_ids, counts, x if p.stage == 0 else None, output, m)
                for w, p in zip(self._workers, self._flat)
            ]
            return self._get(refs)[self._out]
        refs, feed = [], x
        for row in self.stages:
            stage_refs = [self._workers[p.rank].step_ray.remote(seq_ids, counts, feed, output) for p in row]
            refs += stage_refs
            feed = stage_refs[0]  # every shard of a stage ends with the same residual stream
        return self._get(refs)[self._out]

    def _token_tensor(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor(ids, dtype=torch.int64)
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size}): min {lo}, max {hi}")
        return x

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        return self._get([getattr(w, method).remote(*args) for w in self._workers])

    def _get(self, refs: list) -> list[Any]:
        import ray

        try:
            # Wait shard by shard so the first failure surfaces at once: when one shard dies its peers sit in a
            # recv until the gloo timeout, and a plain ray.get(refs) would wait for them too.
            deadline = time.monotonic() + self.timeout_s
            pending = list(refs)
            while pending:
                left = deadline - time.monotonic()
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0.0))
                if not ready:
                    raise ray.exceptions.GetTimeoutError(f"no result within {self.timeout_s:.0f} s")
                ray.get(ready)  # raises the shard's error, if any
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            self._broken = self._describe_failure(refs, exc)
            raise ExecutorError(self._broken) from exc
        except ray.exceptions.RayTaskError as exc:
            # Any shard failing mid-step leaves its peers waiting in a recv/all-reduce: the plan is unusable.
            # (Bad requests are rejected in the driver before anything is sent, see step().)
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            self._broken = f"a shard failed: {type(cause).__name__}: {cause}"
            raise ExecutorError(self._broken) from exc

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
