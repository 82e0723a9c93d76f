"""`ShardWorker`: the Ray actor that holds one shard of a plan on its node.

Each worker reads only its slice of the weights from the model file *on its own node*
(`load_weights(path, cfg, spec)` memory-maps the GGUF and copies out the shard's rows/columns), so every node
needs the model file at the same path. On one machine that holds trivially; on several machines copy the file
(or mount shared storage) at the same path first. Shipping weights through Ray's object store is not built.

Data path of one step (the driver calls `step` on every worker of the plan once per engine step):
  stage 0 gets the token ids in the call; every later stage receives hidden states from the previous stage with
  torch.distributed recv; tensor-parallel shards sum row-parallel outputs with all_reduce inside the forward;
  the last stage's lead shard returns the logits to the driver (Ray's return value). So one token costs one Ray
  round trip per step (the control message + result), not one per stage hop.
A batch of several sequences is split into micro-batches: a stage sends micro-batch k (isend, non-blocking) and
starts on k+1 while the next stage works on k, so stages overlap (GPipe-style, Huang et al. 2019).

The alternative data path (`transport="ray"` in RayExecutor) passes each stage's output to the next as a Ray
object: `step_ray(..., x=<ObjectRef>)`. It is kept to measure against (bench/runtime_bench.py).

Threads: each worker sets torch's intra-op threads to the CPUs its node declares to Ray (`threads` argument), so
N local nodes on one machine do not oversubscribe its cores (local nodes default to 1 CPU each).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Any

import torch

from ..model.shard import ShardSpec

log = logging.getLogger(__name__)



def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _rss_anon() -> int:
    """Anonymous resident bytes (heap: weights, KV cache, temporaries) from /proc/self/status `RssAnon`.

    Total RSS also counts file-backed pages of the memory-mapped GGUF that the loader touched; those are page
    cache shared with every other process reading the file and dropped under pressure, so the memory a shard
    really costs is its anonymous RSS. Falls back to total RSS where /proc is absent.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _rss()


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, inflating RSS after loading)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def micro_batch_bounds(n_seqs: int, micro_batches: int) -> list[tuple[int, int]]:
    """Split n_seqs sequences into `micro_batches` contiguous half-open ranges of near-equal size."""
    m = max(1, min(micro_batches, n_seqs))
    base, extra = divmod(n_seqs, m)
    out, start = [], 0
    for k in range(m):
        size = base + (1 if k < extra else 0)
        out.append((start, start + size))
        start += size
    return out


class ShardWorker:
    """One shard. Created by RayExecutor as `ray.remote(ShardWorker)` pinned to its node; see module docstring."""

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.shard = None
        self.cache = None
        self.comm = None
        self.last_step: dict[str, float] | None = None
        self.rss_baseline = _rss()
        self.anon_baseline = _rss_anon()

    # ---- setup ---------------------------------------------------------------------------------------------
    def load(self, model_path: str, spec: dict[str, Any], dtype: str, max_seq_len: int,
             kv_cache_type: str | None = None) -> dict[str, Any]:
        """Read this shard's weights from `model_path` (on this node) and allocate its KV cache. `dtype` names a
        weight format (model/quant.py WEIGHT_FORMATS: auto, float32, bfloat16, float16, int4), `kv_cache_type`
        the cache's (f32|f16|q8_0; None: the format's default, model/formats.py kv_cache_type)."""
        from ..model.quant import kv_cache_dtype, weight_format
        from ..model.transformer import ModelShard
        from ..model.weights import drop_file_pages, load_weights, read_config

        t0 = time.perf_counter()
        self.spec = ShardSpec(
            tuple(spec["layers"]), tuple(spec["kv_heads"]), tuple(spec["ffn"]), spec["has_embedding"], spec["has_output"]
        )
        cfg = read_config(model_path)
        _trim_heap()
        self.rss_baseline = _rss()  # torch + model code imported, nothing of the model loaded yet
        self.anon_baseline = _rss_anon()
        torch_dtype, quant = weight_format(dtype)
        if quant and self.device.type != "cpu":
            raise ValueError(f"--dtype {dtype} runs on CPU workers only (its kernels are CPU ones; use float16 on GPUs)")
        weights = load_weights(model_path, cfg, self.spec, torch_dtype, quant)
        if self.device.type == "cuda":
            weights = {k: v.to(self.device) for k, v in weights.items()}
            # After loading (the GGUF reader builds host tensors): the KV cache, RoPE tables and index tensors
            # that ModelShard creates from here on follow the weights onto the GPU.
            torch.set_default_device(self.device)
        self.shard = ModelShard(cfg, self.spec, weights, quant, kv_cache_dtype(dtype, kv_cache_type))
        del weights
        drop_file_pages(model_path)
        self.cache = self.shard.new_cache(max_seq_len)
        _trim_heap()
        self.rss_loaded = _rss()
        return dict(self.info(), load_s=time.perf_counter() - t0)

    def weight_bytes(self) -> int:
        """Bytes of distinct tensor storages the shard holds (a tied output head counts once)."""
        return self.shard.weight_bytes()

    def info(self) -> dict[str, Any]:
        """Where this worker really runs (asked of Ray, not taken from the plan) and what it holds."""
        node_id, ip = None, "127.0.0.1"  # outside Ray (bench/runtime_gpu_check.py on a machine without Ray)
        try:
            import ray

            if ray.is_initialized():  # asking the runtime context otherwise *starts* a local Ray instance
                node_id, ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
        except ImportError:
            pass
        return {
            "node_id": node_id,
            "pid": os.getpid(),
            "ip": ip,
            "rss": _rss(),
            "rss_baseline": self.rss_baseline,
            "rss_anon": _rss_anon(),
            "rss_anon_baseline": self.anon_baseline,
            "weight_bytes": self.weight_bytes() if self.shard is not None else 0,
            "cache_bytes": self.cache.nbytes() if self.cache is not None else 0,
            "cached_seqs": sorted(self.cache.seq_ids()) if self.cache is not None else [],
            "threads": torch.get_num_threads(),
            "last_step": getattr(self, "last_step", None),
            "device": str(self.device),
        }

    def free_port(self) -> tuple[str, int]:
        """An unused TCP port on this node's address, for the plan's rendezvous (rank 0 calls this)."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup_comm(self, layout: Any, master_addr: str, master_port: int, backend: str, timeout_s: float) -> bool:
        from .collectives import PlanComm

        self.layout = layout
        self.comm = PlanComm(layout, master_addr, master_port, backend, timeout_s, self.info()["ip"])
        return True

    # ---- per step ------------------------------------------------------------------------------------------
    def step(
        self,
        seq_ids: list[int],
        token_counts: list[int],
        tokens: torch.Tensor | None,
        output: str = "logits",
        micro_batches: int = 1,
    ) -> tuple[torch.Tensor | None, float]:
        """Run this shard on a batch (torch.distributed transport). Returns (out, forward ms): out is the logits (or
        the final hidden states) on the output shard and None on every other; forward ms is this shard's compute,
        all-reduces included, without the wait for the previous stage.

        tokens: int64 packed token ids, given to stage 0 only. micro_batches: how many pieces to split the batch
        into so pipeline stages overlap (every worker of the plan gets the same number).
        """
        shard, comm = self.shard, self.comm
        lay = comm.layout
        outs = []
        offset = 0
        t_recv = t_fwd = t_send = 0.0
        t_start = time.perf_counter()
        for s0, s1 in micro_batch_bounds(len(seq_ids), micro_batches):
            sids, counts = seq_ids[s0:s1], token_counts[s0:s1]
            n = sum(counts)
            t0 = time.perf_counter()
            if lay.is_first_stage:
                x = tokens[offset : offset + n].to(self.device)
            else:
                x = comm.recv_hidden((n, shard.cfg.hidden_size), shard.dtype).to(self.device)
            t1 = time.perf_counter()
            offset += n
            y = self._forward(x, sids, counts, output)
            t_recv, t_fwd = t_recv + t1 - t0, t_fwd + time.perf_counter() - t1
            if not lay.is_last_stage:
                t3 = time.perf_counter()
                comm.send_hidden(y)
                t_send += time.perf_counter() - t3
            elif shard.spec.has_output:
                outs.append(y)
        t2 = time.perf_counter()
        comm.flush()
        # where the last step's time went (ms), for bench/runtime_bench.py and debugging slow hops
        self.last_step = {"recv_ms": t_recv * 1e3, "forward_ms": t_fwd * 1e3, "send_ms": t_send * 1e3,
                          "flush_ms": (time.perf_counter() - t2) * 1e3, "total_ms": (time.perf_counter() - t_start) * 1e3}
        # (output, forward ms): the stage's own compute incl. its all-reduces, not the wait for the previous stage;
        # the executor turns these into per-stage decode times for calibration (StepTimings.stage_ms)
        if not outs:
            return None, t_fwd * 1e3
        return (torch.cat(outs) if len(outs) > 1 else outs[0]).cpu(), t_fwd * 1e3

    def step_ray(self, seq_ids: list[int], token_counts: list[int], x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        """Ray-object transport: `x` is the token ids (stage 0) or the previous stage's output, handed over by the
        driver as an ObjectRef; returns this shard's output for the next stage (or the logits)."""
        return self._forward(x.to(self.device), seq_ids, token_counts, output).cpu()

    def _forward(self, x: torch.Tensor, seq_ids: list[int], counts: list[int], output: str) -> torch.Tensor:
        comm = self.comm
        all_reduce = comm.all_reduce if comm is not None and comm.tp_group is not None else None
        return self.shard.forward(x, seq_ids, counts, self.cache, all_reduce=all_reduce, output=output)

    def free(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self.cache.free(sid)

    # ---- liveness and reuse ------------------------------------------------------------------------------
    def ping(self) -> int:
        """Liveness probe. RayExecutor calls it in the actor's "health" concurrency group, served by its own
        thread, so a shard busy in a long forward or waiting in a recv still answers (torch releases the GIL
        there) while a stopped or wedged process does not (runtime/step_timeout.py)."""
        return os.getpid()

    def reset(self) -> bool:
        """Forget every cached sequence and leave the plan's process groups, keeping the weights: after a
        failure elsewhere in the plan this shard joins the replacement plan without loading again (the engine
        replays every sequence from position 0, so no cache entry may survive)."""
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
        if self.cache is not None:
            for sid in list(self.cache.seq_ids()):
                self.cache.free(sid)
        return True

    def close(self) -> None:
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
        self.shard = None
        self.cache = None
