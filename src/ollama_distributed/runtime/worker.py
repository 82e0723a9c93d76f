"""`ShardWorker`: the Ray actor that holds one shard of a plan on its node.

Each worker reads only its slice of the weights from the model file on its own node (`load_weights(path, cfg,
spec)` memory-maps the GGUF and copies out the shard's rows/columns). A node that lacks the file first fetches
the byte ranges of its shard's tensors from the server's node into its slice cache (runtime/weight_fetch.py), and
reads them from there.

Data path of one step (`step` runs on every worker of the plan once per engine step, called by the resident
loop below, or by the driver directly with transport "calls"):
  stage 0 gets the token ids in the message; every later stage receives hidden states from the previous stage
  with torch.distributed recv; tensor-parallel shards sum row-parallel outputs with all_reduce inside the forward;
  the last stage's lead shard returns the logits (or the sampled token ids) to the driver. So one token costs
  one driver round trip per step (the step message + reply), not one per stage hop.
A batch of several sequences is split into micro-batches: a stage sends micro-batch k (isend, non-blocking) and
starts on k+1 while the next stage works on k, so stages overlap (GPipe-style, Huang et al. 2019).

The alternative data path (`transport="ray"` in RayExecutor) passes each stage's output to the next as a Ray
object: `step_ray(..., x=<ObjectRef>)`. It is kept to measure against (bench/runtime_bench.py).

Resident step loop (the "dist" transport since issue 15): after loading and joining the process groups, the
driver opens a step channel to each worker (runtime/channel.py: shared memory when both run on one machine, TCP
otherwise) and starts `serve`, a call that runs until told to stop, in its own concurrency group. Each engine step
is then one message to each worker and one reply from each — no Ray call per token. The last stage can sample
there too (`sample` in the step message: the engine's per-sequence Samplers, model/sampling.py), replying with
token ids instead of the vocabulary's logits. Ray stays for placement, membership and the liveness probes (`ping`
in the "health" group still answers while `serve` runs).

Threads: each worker sets torch's intra-op threads to the CPUs its node declares to Ray (`threads` argument), so
N local nodes on one machine do not oversubscribe its cores (local nodes default to 1 CPU each).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import pickle
import socket
import time
from collections import deque
from typing import Any, Callable

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


def _normal_priority() -> None:
    """Run at niceness 0. Ray starts worker processes at niceness 15 (the raylet's `worker_niceness`, so that its
    own daemons win the CPU), but a shard is this server's main work: at 15, any busy process on its node — the API
    server and engine thread on the head node, a tokenizer, a test — takes the shard's core first (measured on the
    2-core test machine under load: a one-shard Ray decode 5x slower than the same model in-process). Undone where
    the process may raise its priority (root or CAP_SYS_NICE); elsewhere `ray start` with RAY_worker_niceness=0
    does it for every worker."""
    # niceness is per thread on Linux: every thread Ray started already (its concurrency groups' included)
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except (PermissionError, OSError) as exc:
            log.warning("shard worker stays at niceness %d (%s): start Ray with RAY_worker_niceness=0 so busy processes "
                        "on the node do not take its CPU first", os.getpriority(os.PRIO_PROCESS, 0), exc)
            return


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


def _portable_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Errors leave the actor as their text when they cannot be rebuilt on the driver: Ray pickles a worker's
    exception and unpickles it in the caller, and an exception whose constructor does not take its own args back
    arrived as "Failed to deserialize exception", losing what went wrong (issue 17)."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            try:
                pickle.loads(pickle.dumps(e))
            except Exception:
                raise RuntimeError(f"{type(e).__name__}: {e}") from None
            raise

    return call


class ShardWorker:
    """One shard. Created by RayExecutor as `ray.remote(ShardWorker)` pinned to its node; see module docstring."""

    def __init__(self, threads: int = 1) -> None:
        _normal_priority()
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.shard = None
        self.cache = None
        self.comm = None
        self.last_step: dict[str, float] | None = None
        # (event, time.perf_counter()) of recent steps: each micro-batch's input ready ("in") and output computed
        # ("out"), each sampling done ("sampled"). CLOCK_MONOTONIC is one clock for every process of a host, so a
        # bench subtracts one shard's "out" from the next stage's "in" for the hop (bench/hot_path_bench.py)
        self.timeline: deque[tuple[str, float]] = deque(maxlen=1024)
        self.rss_baseline = _rss()
        self.anon_baseline = _rss_anon()

    # ---- setup ---------------------------------------------------------------------------------------------
    def has_file(self, model_path: str) -> bool:
        """Whether this node sees the model file at the driver's path (else `load` fetches its slice)."""
        return os.path.exists(model_path)

    @_portable_errors
    def load(self, model_path: str, spec: dict[str, Any], dtype: str, max_seq_len: int,
             kv_cache_type: str | None = None, holder: Any = None) -> dict[str, Any]:
        """Read this shard's weights from `model_path` (on this node) and allocate its KV cache. `dtype` names a
        weight format (model/quant.py WEIGHT_FORMATS: auto, float32, bfloat16, float16, int4), `kv_cache_type`
        the cache's (f32|f16|q8_0; None: the format's default, model/formats.py kv_cache_type). Where this node
        lacks the file, the byte ranges of this shard's tensors come from `holder` (runtime/weight_fetch.py) into
        the node's slice cache first."""
        from ..model.quant import kv_cache_dtype, weight_format
        from ..model.transformer import ModelShard
        from ..model.weights import drop_file_pages, load_weights, read_config
        from .weight_fetch import ensure_local, wait_persisted

        t0 = time.perf_counter()
        self.spec = ShardSpec(
            tuple(spec["layers"]), tuple(spec["kv_heads"]), tuple(spec["ffn"]), spec["has_embedding"], spec["has_output"],
            tuple(spec["experts"]) if spec.get("experts") is not None else None,
        )
        where = self.info()
        self.weights_from = ensure_local(model_path, self.spec.layers, self.spec.has_embedding, self.spec.has_output,
                                         holder, f"{where['ip']} ({str(where['node_id'])[:8]})",
                                         experts=self.spec.experts)
        model_path = self.weights_from.path
        cfg = read_config(model_path)
        _trim_heap()
        self.rss_baseline = _rss()  # torch + model code imported, nothing of the model loaded yet
        self.anon_baseline = _rss_anon()
        torch_dtype, quant = weight_format(dtype)
        if quant and self.device.type != "cpu":
            raise ValueError(f"--dtype {dtype} runs on CPU workers only (its kernels are CPU ones; use float16 on GPUs)")
        weights = load_weights(model_path, cfg, self.spec, torch_dtype, quant)
        wait_persisted()  # a fetched slice reaches the disk while the weights are read; loaded means recorded too
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
            "host": socket.gethostname(),
            # where its weights came from: a fetched slice names its bytes (runtime/weight_fetch.py LocalCopy)
            "weights_from": self.weights_from.to_dict() if getattr(self, "weights_from", None) else None,
        }

    def free_port(self) -> tuple[str, int]:
        """An unused TCP port on this node's address, for the plan's rendezvous (rank 0 calls this)."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup_comm(self, layout: Any, master_addr: str, master_port: int, backend: str, timeout_s: float,
                   shm: dict[str, Any] | None = None) -> dict[str, int]:
        """Join the plan's process groups (and the shared-memory paths to co-located ranks, `shm`: see
        collectives.PlanComm); returns how many hops and sums use shared memory."""
        from .collectives import PlanComm

        self.layout = layout
        self.comm = PlanComm(layout, master_addr, master_port, backend, timeout_s, self.info()["ip"], shm)
        return self.comm.shm_paths

    # ---- resident step loop (see module docstring) ---------------------------------------------------------
    def open_channel(self, spec: dict[str, Any]) -> tuple[str, int] | None:
        """Attach to the driver's shared-memory rings (spec kind "shm": `req`, `rep` ring specs), or listen for
        the driver's TCP connection (kind "tcp": `authkey`; returns the address to connect to, accepted by
        `serve`)."""
        from .channel import ShmRing, SocketChannel

        self._close_channel()
        self._samplers: dict[int, Any] = {}
        self._fed_back: dict[int, int] = {}  # seq id -> the token it last sampled here (a step fed back uses it)
        self._prefed: list[int] | None = None  # the next step's feed, sent early (`_feed_early`)
        if spec["kind"] == "shm":
            r, w = spec["req"], spec["rep"]
            self._req = ShmRing.attach(r["path"], r["slots"], r["slot_bytes"])
            self._rep = ShmRing.attach(w["path"], w["slots"], w["slot_bytes"])
            return None
        self._listener = SocketChannel.listen(self.info()["ip"], spec["authkey"])
        return self._listener.address

    def serve(self) -> int:
        """Run steps from the channel until a "stop" message; returns the number of steps run. A step that fails
        is answered with ("err", message) and the loop goes on (the driver then gives the plan up)."""
        from .channel import ChannelClosed, SocketChannel

        if self.device.type == "cuda":
            torch.set_default_device(self.device)  # the loop runs on its own thread
        listener = getattr(self, "_listener", None)
        if listener is not None:
            chan = SocketChannel(listener.accept())
            listener.close()
            self._listener = None
            self._req = self._rep = chan
        steps = 0
        nxt = None  # the next message, when it was read early (`_feed_early`)
        try:
            while True:
                msg, nxt = nxt if nxt is not None else pickle.loads(self._req.recv()), None
                kind = msg[0]
                if kind == "stop":
                    return steps
                try:
                    if kind == "step":
                        reply = self._serve_step(*msg[1:])
                        steps += 1
                        nxt = self._feed_early()
                    elif kind == "free":
                        self.free(msg[1])
                        reply = ("ok", None, 0.0)
                    elif kind == "rewind":  # steps sent ahead that the engine did not take (lookahead.py)
                        for sid, n in msg[1].items():
                            self.cache.rewind(sid, n)
                            self._forget_sampling(sid)
                        reply = ("ok", None, 0.0)
                    else:
                        raise ValueError(f"unknown step message {kind!r}")
                except Exception as exc:  # noqa: BLE001 - reported to the driver, which gives the plan up
                    log.exception("shard step failed")
                    reply = ("err", f"{type(exc).__name__}: {exc}")
                self._rep.send(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except ChannelClosed:
            return steps
        finally:
            self._close_channel()

    def _serve_step(self, seq_ids: list[int], counts: list[int], tokens: list[int] | None, output: str,
                    micro_batches: int, sample: list[Any] | None) -> tuple[str, Any, float]:
        first = self.comm.layout.is_first_stage
        if tokens is None:  # a step sent ahead of the last one's answer: fed what the output rank sampled in it
            tokens, self._prefed = self._prefed if self._prefed is not None else self._fed_tokens(seq_ids), None
            if sample is not None and tokens is not None:  # the sampler's recent tokens end with its own draw
                sample = [None if e is None else (e[0], [*e[1], int(t)]) for e, t in zip(sample, tokens)]
        x = torch.tensor(tokens, dtype=torch.int64) if first else None
        out, fwd_ms = self.step(seq_ids, counts, x, output, micro_batches)
        if out is None:
            return ("ok", None, fwd_ms)
        if sample is None:  # numpy arrays pickle without copies (protocol 5); bfloat16 has no numpy type
            return ("ok", out.numpy() if out.dtype in (torch.float32, torch.float16) else out, fwd_ms)
        sampled = self._sample(seq_ids, out, sample)
        self.timeline.append(("sampled", time.perf_counter()))
        return ("ok", sampled, fwd_ms)

    def _feed_early(self) -> Any:
        """On an output rank that feeds stage 0: when the next message is already here (it is while two steps go
        ahead) and is a step fed back, send its tokens now, before this step's reply to the driver, so stage 0
        starts ~0.1 ms sooner. Returns the message read (None if none), which the loop handles next."""
        if not self.comm.layout.feed_to or not self._req.poll():
            return None
        nxt = pickle.loads(self._req.recv())
        if nxt[0] == "step" and nxt[3] is None:
            self._prefed = self._fed_tokens(nxt[1])
        return nxt

    def _fed_tokens(self, seq_ids: list[int]) -> Any:
        """A fed-back step's input tokens (collectives.py): the output rank takes its own last samples and sends
        them to stage 0's other ranks, which receive them; a rank that needs them for neither gets None."""
        lay = self.comm.layout
        if lay.rank == lay.output_rank:
            tokens = [self._fed_back[sid] for sid in seq_ids]
            self.comm.send_feed(tokens)
            return tokens
        if lay.feed_from is not None:
            return self.comm.recv_feed(len(seq_ids))
        return None

    def _sample(self, seq_ids: list[int], logits: torch.Tensor, sample: list[Any]) -> dict[str, Any]:
        """Sample each row whose entry in `sample` is not None: (sampler or None, recent tokens). A sampler comes
        with the first step it samples for (again whenever the driver's changes); it is then kept per sequence,
        so its generator (and grammar constraint) advances here. Non-greedy rows return their generator state,
        which the driver copies into its own sampler, so a replay after a failure continues the same random
        stream; rows that asked for logprobs return them."""
        toks: list[int | None] = []
        states: dict[int, Any] = {}
        logprobs: dict[int, Any] = {}  # rows whose request asked for logprobs (model/sampling.py TokenLogprob)
        for row, (sid, entry) in enumerate(zip(seq_ids, sample)):
            if entry is None:
                toks.append(None)
                continue
            sampler, recent = entry
            if sampler is not None:
                self._samplers[sid] = sampler
            s = self._samplers[sid]
            toks.append(s.sample(logits[row], recent))  # a grammar constraint masks, then advances, here
            self._fed_back[sid] = toks[-1]
            if not s.options.is_greedy:
                states[row] = s.generator.get_state().numpy()
            if getattr(s, "top_logprobs", None) is not None:
                logprobs[row] = s.last_logprobs
        return {"tokens": toks, "states": states, "logprobs": logprobs}

    def _close_channel(self) -> None:
        for name in ("_req", "_rep", "_listener"):
            ch = getattr(self, name, None)
            if ch is not None:
                try:
                    ch.close()
                except Exception:  # noqa: BLE001 - already closed by the other side
                    pass
                setattr(self, name, None)

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
            t3 = time.perf_counter()
            t_recv, t_fwd = t_recv + t1 - t0, t_fwd + t3 - t1
            self.timeline.append(("in", t1))
            self.timeline.append(("out", t3))
            if not lay.is_last_stage:
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

    def recent_steps(self) -> list[tuple[str, float]]:
        """The timeline of recent steps (see __init__), oldest first."""
        return list(self.timeline)

    def free(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self.cache.free(sid)
            self._forget_sampling(sid)

    def _forget_sampling(self, sid: int) -> None:
        """Drop the sequence's Sampler copy and fed-back token (the driver re-sends the sampler when it next
        samples; the step loop's state exists only once a channel is open)."""
        getattr(self, "_samplers", {}).pop(sid, None)
        getattr(self, "_fed_back", {}).pop(sid, None)

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
        self._samplers = {}
        self._close_channel()
        return True

    def close(self) -> None:
        self._close_channel()
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None
        self.shard = None
        self.cache = None
