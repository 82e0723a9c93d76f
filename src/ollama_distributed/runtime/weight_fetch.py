"""Weights reach the nodes: a shard whose node lacks the model file fetches exactly its own tensors' bytes.

Every shard reads only its slice of a GGUF (model/weights.py memory-maps the file and copies out its tensors), so
a node without the file needs only the file's header and the byte ranges of the tensors its shard reads, not the
whole 10-100 GB. This module moves those ranges:

- The holder (`WeightHolder`, a Ray actor pinned to the node that has the file: the server's) splits the file into
  fixed chunks and hashes each one (`ChunkTable`, XXH3-128 per chunk, slice_cache.py `chunk_hash`; one sequential
  pass, kept in a versioned sidecar so a restart reuses it). A content-addressed blob (`sha256-<hex>`, the model
  store's name) must also match its own name (sha256 of the whole file, in the same pass), so a corrupt holder
  file is refused rather than served.
- The fetcher (`ensure_local`, run by the shard worker before it loads) asks for the chunks covering its tensors,
  receives each straight into its place in a sparse copy of the file in a node-local cache keyed by the file's
  digest (`<cache>/<digest>/model.gguf`, mapped into memory), checks it against the holder's table (a mismatch is
  fetched once more, then refused with the chunk named), and hands the loader that copy at once: the header is
  there and every tensor it reads is there, in the page cache; the holes are tensors of other shards. Making the
  chunks durable (fsync, then `chunks.json`, the chunks on disk and verified) follows on a thread while the loader
  reads (slice_cache.py `_Persister`; the load returns once it is done). A re-plan, restart or recovery on that
  node reuses what is cached, after checking the cached chunks against the table again; an interrupted transfer
  resumes where it stopped, because only verified chunks that reached the disk are recorded; a full disk is refused
  before the first byte (the missing chunks' blocks are allocated up front), never a half-written model taken as
  whole.

Transport (weight_stream.py): the holder and every SlicePeer serve byte ranges on a TCP port of their node's
cluster address (`socket.sendfile`), to clients that prove the server's secret by HMAC challenge-response; the
secret and the address are handed out only over Ray (`endpoint()`), whose RPCs need the cluster's token with
RAY_AUTH_MODE=token and are encrypted with RAY_USE_TLS=1; with RAY_USE_TLS=1 the stream is TLS too, with Ray's
certificates. Several ranges are requested ahead on one connection. Where the stream cannot be reached (a
firewall) or breaks, the chunks travel as Ray objects instead (the source's `read`; Ray's object manager, under the
same token and TLS). Whatever the transport, a chunk counts only once it matches the holder's table.

Peers: a node whose slice cache holds chunks of the file serves them too (`SlicePeer`, one actor per such node,
started by the driver when another node is about to fetch); the fetcher asks the holder and the peers holding a
chunk in turn and checks every chunk against the holder's table, so a lying or stale peer is caught and the chunk
asked of the holder instead.

What the planner is told (`weight_sources`): which nodes hold the file and which verified chunks each node's cache
holds, asked of the nodes themselves, so a plan says what its nodes fetch and prefers the holders
(scheduler/load_cost.py); `prefetch` fetches a plan's slices ahead of its load (`/api/pull`, service/prefetch.py).

Why chunks of the file, not tensors: one table serves every plan (TP rows, PP layers, expert subsets pick
different tensors), a chunk is the unit that is verified, cached and resumed, and the over-fetch is at most one
chunk at each end of a contiguous run (tensors of one layer sit together in llama.cpp's files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..scheduler.load_cost import FileLayout, TensorExtent, chunks_covering
from ..scheduler.load_cost import shard_chunks as layout_chunks
from ..scheduler.load_cost import shard_tensor_names  # noqa: F401 - the fetcher's rule, re-exported for its callers
from .slice_cache import (CHUNK_HASH, ChunkTable, SliceCache, WeightFetchError, _CacheLock, _chunk_len,  # noqa: F401
                          _Persister, _persisting, cache_root, chunk_hash, wait_persisted)
from .weight_stream import ChunkServer, ChunkStream, Endpoint, TLSFiles

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # verified unit: large enough that per-call overhead is small, small enough to resume cheaply
IN_FLIGHT = 8  # chunks requested at once: keeps the link busy while one is verified and written
TABLE_VERSION = 2  # sidecars of another version (1: sha256 per chunk) are computed again
_BLOB_NAME = re.compile(r"^sha256[-:]([0-9a-f]{64})$")


def chunk_table(path: str | Path, chunk_bytes: int = CHUNK_BYTES, sidecar_dir: Path | None = None) -> ChunkTable:
    """The table of `path`, computed in one pass (reading the file once) or taken from its sidecar when the file's
    size and mtime are those it was computed for. Raises WeightFetchError if a blob named by its digest does not
    hash to that name."""
    from ..model.gguf_index import GGUFIndex

    p = Path(path)
    st = p.stat()
    sidecar = _sidecar(p, chunk_bytes, sidecar_dir)
    saved = _saved_table(p, chunk_bytes, sidecar_dir)
    if saved is not None:
        return saved
    t0 = time.perf_counter()
    whole, hashes = hashlib.sha256(), []
    with open(p, "rb") as f:
        while block := f.read(chunk_bytes):
            whole.update(block)
            hashes.append(chunk_hash(block))
    digest = whole.hexdigest()
    named = _BLOB_NAME.match(p.name)
    if named and named.group(1) != digest:
        raise WeightFetchError(f"{p}: the file's sha256 is {digest}, not the digest it is named by; the model "
                               "store's copy is corrupt (pull or create it again)")
    table = ChunkTable(digest, st.st_size, GGUFIndex(p).data_offset, chunk_bytes, tuple(hashes))
    log.info("weights: hashed %s (%.1f GB) in %.1f s for fetching nodes", p.name, st.st_size / 1e9,
             time.perf_counter() - t0)
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(asdict(table), mtime_ns=st.st_mtime_ns, version=TABLE_VERSION)))
        os.replace(tmp, sidecar)
    except OSError as e:  # a read-only home: the table is recomputed next time
        log.warning("weights: cannot keep the chunk table of %s in %s (%s)", p, sidecar, e)
    return table


def _sidecar(p: Path, chunk_bytes: int, sidecar_dir: Path | None) -> Path:
    key = hashlib.sha256(f"{p.resolve()}|{chunk_bytes}".encode()).hexdigest()[:24]
    return (sidecar_dir or cache_root() / "tables") / f"{key}.json"


def _saved_table(p: Path, chunk_bytes: int, sidecar_dir: Path | None = None) -> ChunkTable | None:
    """The table kept in `p`'s sidecar when it was computed for the file as it is now (size and mtime), else None."""
    try:
        st = p.stat()
        saved = json.loads(_sidecar(p, chunk_bytes, sidecar_dir).read_text())
        if (saved.get("version") == TABLE_VERSION and saved["size"] == st.st_size
                and saved["mtime_ns"] == st.st_mtime_ns):
            return ChunkTable(saved["digest"], saved["size"], saved["data_offset"], saved["chunk_bytes"],
                              tuple(saved["hashes"]), saved["hash_name"])
    except (OSError, ValueError, KeyError):
        pass
    return None


class WeightHolder:
    """Serves chunks of model files on the node that has them (run as a Ray actor, `holder_actor()`), and keeps
    every fetching node's progress for the status endpoint.

    max_bytes_per_s: a cap on what it serves (0: none), so a cold node's fetch leaves room on a shared link for the
    traffic of models already serving (OLLAMA_DISTRIBUTED_WEIGHT_RATE)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, max_bytes_per_s: float = 0.0) -> None:
        self.chunk_bytes = chunk_bytes
        self.max_bytes_per_s = max_bytes_per_s
        self._tables: dict[str, ChunkTable] = {}
        self._lock = threading.Lock()
        self._progress: dict[tuple[str, str], dict[str, Any]] = {}
        self._served = 0
        self._paced = 0  # bytes admitted by the rate cap (ahead of _served while they are being sent)
        self._t0 = time.monotonic()
        self._files: dict[str, str] = {}  # digest -> path: the files whose table was asked for, served by the stream
        self._server: ChunkServer | None = None

    def table(self, path: str) -> ChunkTable:
        if os.path.isdir(path):
            raise WeightFetchError(f"{path} is a directory (a Hugging Face model): only GGUF files are fetched "
                                   "by nodes that lack them; place the directory on every node")
        with self._lock:  # one pass per file even when several shards ask at once
            st = os.stat(path)
            key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
            if key not in self._tables:
                self._tables[key] = chunk_table(path, self.chunk_bytes)
            self._files[self._tables[key].digest] = path
            return self._tables[key]

    def endpoint(self) -> Endpoint:
        """Where this holder's stream listens and its secret (started on first use): asked over Ray only."""
        with self._lock:
            if self._server is None:
                self._server = ChunkServer(self._files.get, self._pace, self._count, _node_address(),
                                           TLSFiles.from_env())
            return self._server.endpoint

    def shard_chunks(self, path: str, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                     experts: tuple[int, int] | None) -> list[int]:
        return shard_chunks(path, layers, has_embedding, has_output, experts, self.chunk_bytes)

    def read(self, path: str, start: int, end: int) -> bytes:
        """The range as bytes: the Ray object-store path, taken when the stream cannot be reached."""
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        self._pace(len(data))
        self._count(len(data))
        return data

    def _pace(self, n: int) -> None:
        if self.max_bytes_per_s <= 0:
            return
        with self._lock:
            self._paced += n
            due = self._t0 + self._paced / self.max_bytes_per_s
        time.sleep(max(0.0, due - time.monotonic()))

    def _count(self, n: int) -> None:
        with self._lock:
            self._served += n

    def served_bytes(self) -> int:
        return self._served

    def report(self, node: str, model: str, done: int, total: int, rate: float, state: str) -> None:
        eta = (total - done) / rate if rate > 0 and done < total else 0.0
        self._progress[(node, model)] = dict(node=node, model=model, bytes_done=done, bytes_total=total,
                                            bytes_per_s=round(rate), eta_s=round(eta, 1), state=state,
                                            updated=time.time())

    def progress(self) -> list[dict[str, Any]]:
        return sorted(self._progress.values(), key=lambda r: (r["model"], r["node"]))


def _node_address() -> str:
    """This node's cluster address (Ray's), where its weight stream listens; 127.0.0.1 outside Ray."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _cached_file(digest: str) -> Path:
    return cache_root() / digest / "model.gguf"


HOLDER_NAME = "ollama-distributed-weights"
_holder: tuple[str, Any] | None = None


def holder_actor() -> Any:
    """The cluster's WeightHolder, started on first use on this process's node (the driver's: the server holds
    the model store), found by name afterwards. OLLAMA_DISTRIBUTED_WEIGHT_RATE caps what it serves (bytes/s);
    OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES sets the verified unit (tests use small ones on tiny files)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    global _holder
    job = ray.get_runtime_context().get_job_id()
    if _holder is not None and _holder[0] == job:
        return _holder[1]
    here = ray.get_runtime_context().get_node_id()
    chunk = int(os.environ.get("OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES", CHUNK_BYTES))
    rate = float(os.environ.get("OLLAMA_DISTRIBUTED_WEIGHT_RATE", 0))
    # Kept for the life of this process: Ray ends an actor once its creator's handle is gone, even a named one
    # (handles found by name do not keep it alive), so this first handle must never be dropped or replaced.
    handle = ray.remote(WeightHolder).options(
        name=HOLDER_NAME, get_if_exists=True, num_cpus=0, max_concurrency=16,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(chunk, rate)
    _holder = (job, handle)  # per Ray connection: a process that reconnects gets a holder in the new cluster
    return handle


def holder_progress() -> list[dict[str, Any]]:
    """Every node's transfer progress as the holder last heard it ([] when nothing was fetched)."""
    import ray

    try:
        return ray.get(ray.get_actor(HOLDER_NAME).progress.remote(), timeout=5)
    except (ValueError, ray.exceptions.RayError):
        return []


@dataclass(frozen=True)
class Peered:
    """What a shard's load is given instead of the bare holder when other nodes hold chunks of the file in their
    slice caches: the holder, and (SlicePeer actor, chunks it holds) per such node."""

    holder: Any
    peers: tuple[tuple[Any, frozenset[int]], ...]


class SlicePeer:
    """Serves the verified chunks of a node's slice cache to other nodes (a Ray actor on that node,
    `peer_actor()`), so a model's weights leave the server's node once per chunk, not once per node that needs it.
    It reads what its node's cache recorded as verified; the fetching node checks every chunk against the holder's
    table anyway."""

    def __init__(self) -> None:
        self._served = 0
        self._lock = threading.Lock()  # reads run on several of the actor's threads at once
        self._server: ChunkServer | None = None

    def read(self, digest: str, start: int, end: int) -> bytes:
        with open(_cached_file(digest), "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        self._count(len(data))
        return data

    def endpoint(self) -> Endpoint:
        """This peer's stream (as the holder's, WeightHolder.endpoint), serving its node's slice caches."""
        with self._lock:
            if self._server is None:
                self._server = ChunkServer(self._resolve, lambda n: None, self._count, _node_address(),
                                           TLSFiles.from_env())
            return self._server.endpoint

    @staticmethod
    def _resolve(digest: str) -> str | None:
        path = _cached_file(digest) if _HEX64.fullmatch(digest) else None  # a digest, never a path
        return str(path) if path is not None and path.exists() else None

    def _count(self, n: int) -> None:
        with self._lock:
            self._served += n

    def served_bytes(self) -> int:
        return self._served


_peers: dict[tuple[str, str], Any] = {}  # (job, node id) -> handle, kept for this process (as the holder's)


def peer_actor(node_id: str) -> Any:
    """The SlicePeer on `node_id`, started on first use, found by name afterwards."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    key = (ray.get_runtime_context().get_job_id(), node_id)
    if key not in _peers:
        _peers[key] = ray.remote(SlicePeer).options(
            name=f"ollama-distributed-slices-{node_id[:16]}", get_if_exists=True, num_cpus=0, max_concurrency=16,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    return _peers[key]


def with_peers(holder: Any, model_path: str | Path, cluster: Any, lacking: Iterable[str]) -> Any:
    """`holder`, or Peered(holder, peers) when nodes other than `lacking` (the nodes about to fetch) hold chunks of
    the file in their slice caches (asked of the nodes, weight_sources)."""
    try:
        sources = weight_sources(model_path, cluster, None)
        if sources is None:
            return holder
        skip = set(lacking)
        peers = tuple((peer_actor(cluster.node_id(n)), h.chunks) for n, h in sources.holdings.items()
                      if n not in skip and not h.has_file and h.chunks)
    except Exception as exc:  # noqa: BLE001 - peers only take load off the holder, which serves everything
        log.warning("weights: no peers for %s: %s", Path(model_path).name, exc)
        return holder
    if peers:
        log.info("weights: %d node(s) serve cached chunks of %s besides the holder", len(peers), Path(model_path).name)
    return Peered(holder, peers) if peers else holder


# ---- the fetcher's side ----------------------------------------------------------------------------------------
_EXPERT_TENSOR = re.compile(r"\.ffn_(gate|up|down)_exps\.")


def file_layout(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> FileLayout:
    """The scheduler's view of a GGUF (scheduler/load_cost.py FileLayout): its tensors' byte ranges, from the header
    alone. Which tensors a shard reads, and so which chunks it fetches, is decided there, once, for the planner
    (bytes a plan will fetch) and the fetcher (chunks it asks for) alike."""
    from ..model.gguf_index import GGUFIndex

    index = GGUFIndex(path)
    tensors = tuple(TensorExtent(t.name, int(t.data_offset), int(t.n_bytes),
                                 int(t.shape[-1]) if _EXPERT_TENSOR.search(t.name) else 0) for t in index.tensors)
    return FileLayout(Path(path).stat().st_size, index.data_offset, chunk_bytes, tensors)


def chunks_for(ranges: Iterable[tuple[int, int]], table: ChunkTable) -> list[int]:
    """Indices of the chunks that cover the byte ranges, and the header's."""
    return chunks_covering(ranges, table.size, table.data_offset, table.chunk_bytes)


def shard_chunks(path: str | Path, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                 experts: tuple[int, int] | None = None, chunk_bytes: int = CHUNK_BYTES) -> list[int]:
    """The chunks a node without the file needs for this shard (its tensors' and the header's), from the header
    alone: the holder answers this, so the fetching node asks for everything in one pipelined run."""
    return layout_chunks(file_layout(path, chunk_bytes), layers, has_embedding, has_output, experts)


def slice_bytes(path: str | Path, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                experts: tuple[int, int] | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Bytes a node without the file fetches for this shard (whole chunks, header included): what a plan costs
    in transfer before it can run."""
    layout = file_layout(path, chunk_bytes)
    return sum(layout.chunk_len(i) for i in layout_chunks(layout, layers, has_embedding, has_output, experts))


@dataclass(frozen=True)
class LocalCopy:
    """Where a shard reads its weights on this node, and what it took to get them there."""

    path: str
    fetched_bytes: int = 0  # moved over the network for this load
    slice_bytes: int = 0  # the chunks this shard needs (header included); 0 when the node has the file
    seconds: float = 0.0  # the transfer: from the first chunk asked for to the last one received and verified
    table_s: float = 0.0  # waiting for the holder's chunk table (its one pass over the file, the first time)
    verify_s: float = 0.0  # re-checking the chunks this node's cache already held against the table
    transport: str = ""  # "stream" (weight_stream.py), "ray" (object store: the stream was not reachable), both

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_local(model_path: str, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                 holder: Any, node: str, cache_dir: Path | None = None,
                 experts: tuple[int, int] | None = None) -> LocalCopy:
    """A path on this node holding every byte this shard reads of `model_path`: the file itself where this node
    has it, else the slice cache, completed from `holder` (a WeightHolder actor handle). `experts`: the MoE
    experts [start, end) the shard holds (None: all).

    Chunks the cache already held are checked against the table again (cheap with the fast hash; `verify_s`) and
    fetched again if they changed. Fetched chunks land in the page cache through a mapping of the cache file, where
    the loader reads them; their fsync and record follow on a thread (wait_persisted)."""
    import ray

    if os.path.exists(model_path):
        return LocalCopy(model_path)
    peers: tuple[tuple[Any, frozenset[int]], ...] = ()
    if isinstance(holder, Peered):
        holder, peers = holder.holder, holder.peers
    if holder is None:
        raise WeightFetchError(f"node {node} lacks {model_path} and no node serves it: GGUF files are fetched from the "
                               "server's node, Hugging Face directories must be present on every node")
    t_table = time.perf_counter()
    table: ChunkTable = ray.get(holder.table.remote(model_path))
    need: list[int] = ray.get(holder.shard_chunks.remote(model_path, layers, has_embedding, has_output, experts))
    t0 = time.perf_counter()
    cache = SliceCache(table, cache_dir)
    lock: _CacheLock | None = cache.lock()
    try:
        done = cache.present()
        verify_s, cached = 0.0, [i for i in need if i in done]
        if cached:
            tv = time.perf_counter()
            bad = cache.verify(cached)
            verify_s = time.perf_counter() - tv
            if bad:
                log.warning("weights: %d cached chunk(s) of %s on node %s changed on disk; fetching them again",
                            len(bad), Path(model_path).name, node)
                done -= bad
                cache.record(done)
        missing = [i for i in need if i not in done]
        total = sum(_chunk_len(table, i) for i in need)
        fetched = sum(_chunk_len(table, i) for i in missing)
        cache.prepare(missing, node)
        t0 += verify_s  # the transfer's clock starts after the re-check
        transport = ""
        if missing:
            persister = _Persister(cache, done, lock)
            lock = None  # the persister releases it once the last chunk is recorded
            _persisting.append(persister)
            try:
                transport = _fetch(cache, missing, holder, model_path, node, persister,
                                   base=total - fetched, total=total, peers=peers)
            finally:
                persister.close()
        else:
            holder.report.remote(node, Path(model_path).name, total, total, 0.0, "cached")
    finally:
        if lock is not None:
            lock.release()
    return LocalCopy(str(cache.path), fetched, total, time.perf_counter() - t0, t0 - verify_s - t_table, verify_s,
                     transport)


class _Puller:
    """Fetches a list of chunks from one source (the holder or a SlicePeer) into `view` (the cache file's mapping),
    on its own thread: over the source's stream (weight_stream.py), IN_FLIGHT ranges requested ahead on one
    connection; where the stream cannot be reached or breaks, the rest over Ray (the source's `read`). Each chunk
    is hashed where it landed; `(index, ok, transport)` goes to `events`, then None when the list is done. A peer
    that fails both ways reports its remaining chunks as not ok (the holder is asked for them); a holder that does
    puts the exception."""

    def __init__(self, source: Any, key: str, indices: list[int], table: ChunkTable, mm: mmap.mmap,
                 view: memoryview, events: queue.Queue, tls: TLSFiles | None, is_peer: bool = False) -> None:
        self.source, self.key, self.indices, self.table = source, key, indices, table
        self.mm, self.view, self.events, self.tls, self.is_peer = mm, view, events, tls, is_peer
        self.reported: set[int] = set()
        self.stream: ChunkStream | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="weight-fetch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        if self.stream is not None:
            self.stream.close()  # unblocks a receive

    def _run(self) -> None:
        import ray

        try:
            rest = self.indices
            try:
                endpoint = ray.get(self.source.endpoint.remote(), timeout=30)
                self.stream = ChunkStream(endpoint, self.tls)
            except (OSError, ray.exceptions.RayError) as exc:
                log.warning("weights: the weight stream is not reachable (%s); chunks travel over Ray", exc)
            if self.stream is not None:
                try:
                    rest = self._over_stream(self.stream)
                finally:
                    self.stream.close()
            if rest and not self.stopped:
                self._over_ray(rest)
        except BaseException as exc:  # noqa: BLE001 - handed to the fetching thread, which raises it
            if not self.is_peer:
                self.events.put(exc)
            else:
                log.warning("weights: a peer failed to serve chunks (%s); the holder is asked for them", exc)
                for i in self.indices:
                    if i not in self.reported:
                        self.events.put((i, False, ""))
        finally:
            self.events.put(None)

    def _put(self, i: int, ok: bool, how: str) -> None:
        self.reported.add(i)
        self.events.put((i, ok, how))

    def _over_stream(self, stream: ChunkStream) -> list[int]:
        """Receive the chunks; returns those not received when the stream broke (to fetch over Ray)."""
        digest, indices, sent = self.table.digest, self.indices, 0
        for k, i in enumerate(indices):
            if self.stopped:
                return []
            try:
                while sent < len(indices) and sent - k < IN_FLIGHT:
                    start, end = self.table.chunk_range(indices[sent])
                    stream.request(digest, start, end - start)
                    sent += 1
                start, end = self.table.chunk_range(i)
                _populate(self.mm, start, end)
                part = self.view[start:end]
                try:
                    stream.receive_into(part)
                    ok = chunk_hash(part) == self.table.hashes[i]
                finally:
                    part.release()
            except OSError as exc:
                if self.stopped:
                    return []
                log.warning("weights: the weight stream broke after %d of %d chunks (%s); the rest over Ray", k,
                            len(indices), exc)
                return indices[k:]
            self._put(i, ok, "stream")
        return []

    def _over_ray(self, indices: list[int]) -> None:
        import ray

        queue_, pending = list(indices), {}
        while (queue_ or pending) and not self.stopped:
            while queue_ and len(pending) < IN_FLIGHT:
                i = queue_.pop(0)
                start, end = self.table.chunk_range(i)
                pending[self.source.read.remote(self.key, start, end)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            data = ray.get(ready[0])
            start, end = self.table.chunk_range(i)
            ok = len(data) == end - start and chunk_hash(data) == self.table.hashes[i]
            if ok:
                self.view[start:end] = data
            self._put(i, ok, "ray")


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python's mmap names it from 3.13
_populate_ok = True


def _populate(mm: mmap.mmap, start: int, end: int) -> None:
    """Fault the range's pages in with one call before a chunk is received into them, instead of one page fault
    per 4 KiB inside the receive (twice the landing rate on a tmpfs cache here; bench/README.md). Skipped where the
    kernel lacks it."""
    global _populate_ok
    if _populate_ok:
        page = mmap.PAGESIZE
        lo = start - start % page
        try:
            mm.madvise(_MADV_POPULATE_WRITE, lo, end - lo)
        except (OSError, ValueError):
            _populate_ok = False


def _fetch(cache: SliceCache, indices: list[int], holder: Any, model_path: str, node: str, persister: _Persister,
           base: int, total: int, peers: tuple[tuple[Any, frozenset[int]], ...] = ()) -> str:
    """Fetch and verify `indices` into the cache file's mapping (one _Puller per source), handing each verified
    chunk to `persister`. A chunk that peers hold (SlicePeer: nodes that fetched it before) is asked of the holder
    and those peers in turn, so the holder's link carries only a share of it; every chunk is checked against the
    holder's table whoever sent it, and one that does not match is asked of the holder once more, then refused.
    Returns the transports used."""
    table, name = cache.table, Path(model_path).name
    tls = TLSFiles.from_env()
    sources: list[tuple[Any, str]] = [(holder, model_path)] + [(p, table.digest) for p, _ in peers]
    work: dict[int, list[int]] = {}
    for turn, i in enumerate(indices):
        holding = [0] + [k + 1 for k, (_, held) in enumerate(peers) if i in held]
        work.setdefault(holding[turn % len(holding)], []).append(i)
    got, t0, last_report = 0, time.perf_counter(), 0.0
    retried: set[int] = set()
    transports: set[str] = set()
    fd = os.open(cache.path, os.O_RDWR)
    mm = mmap.mmap(fd, table.size)
    view = memoryview(mm)
    pullers: list[_Puller] = []
    try:
        while work:
            events: queue.Queue = queue.Queue()
            pullers = [_Puller(*sources[s], idx, table, mm, view, events, tls, is_peer=s > 0)
                       for s, idx in sorted(work.items())]
            running, failed = len(pullers), []
            while running:
                ev = events.get()
                if ev is None:
                    running -= 1
                    continue
                if isinstance(ev, BaseException):
                    raise WeightFetchError(f"node {node}: fetching {name} failed: {ev}") from ev
                i, ok, how = ev
                if not ok:
                    if i in retried:
                        raise WeightFetchError(
                            f"node {node}: chunk {i} of {model_path} (bytes {table.chunk_range(i)[0]}-"
                            f"{table.chunk_range(i)[1]}) does not match its {table.hash_name} hash from the holder's "
                            "table twice: the holder's file changed or is corrupt; refused")
                    log.warning("weights: chunk %d of %s failed verification; fetching it again", i, name)
                    failed.append(i)
                    continue
                transports.add(how)
                persister.add(i)
                got += _chunk_len(table, i)
                now = time.perf_counter()
                if now - last_report > 0.5 or got == total - base:
                    rate = got / max(now - t0, 1e-6)
                    holder.report.remote(node, name, base + got, total, rate,
                                         "done" if got == total - base else "fetching")
                    log.info("weights: node %s %s %.0f/%.0f MB at %.0f MB/s", node, name, (base + got) / 1e6,
                             total / 1e6, rate / 1e6)
                    last_report = now
            retried.update(failed)
            work = {0: failed} if failed else {}  # the second try of a chunk goes to the holder
    finally:
        for p in pullers:
            p.stop()
        for p in pullers:
            p.thread.join(timeout=30)
        view.release()
        try:
            mm.close()  # the pages stay in the page cache (the loader reads them there) and reach the disk by fsync
        except BufferError:  # a puller still holds a slice (stuck): the mapping goes with it
            pass
        os.close(fd)
    return "+".join(sorted(transports))


# ---- what the planner is told (scheduler/load_cost.py) ------------------------------------------------------------
def chunk_bytes_setting() -> int:
    """The verified unit the holder uses (OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES, read in the server's process)."""
    return int(os.environ.get("OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES", CHUNK_BYTES))


def known_digest(path: str | Path, chunk_bytes: int) -> str | None:
    """The file's sha256 without reading it: a model-store blob is named by it, else a chunk table kept for the file
    as it is now. None when neither (a slice cache, keyed by digest, cannot be matched before the holder hashes the
    file; its first load hashes it)."""
    p = Path(path)
    named = _BLOB_NAME.match(p.name)
    if named:
        return named.group(1)
    saved = _saved_table(p, chunk_bytes)
    return saved.digest if saved is not None else None


def node_holding(model_path: str, digest: str | None, chunk_bytes: int) -> tuple[bool, list[int]]:
    """Run on a node: whether it sees the file, and which verified chunks of it its slice cache holds."""
    if os.path.exists(model_path):
        return True, []
    if digest is None:
        return False, []
    cache = SliceCache(ChunkTable(digest, 0, 0, chunk_bytes, ()))
    return False, sorted(cache.present())


_HOLDS_FILE: set[tuple[str, str, int, int]] = set()  # (node_id, path, size, mtime_ns) seen holding the file


def weight_sources(model_path: str | Path, cluster: Any, spec: Any, timeout_s: float = 10.0,
                   only: Iterable[str] | None = None) -> Any:
    """The scheduler's WeightSources for a GGUF on `cluster`'s alive nodes (None for a Hugging Face directory,
    which every node must hold, or without a Ray connection): the holder is this process's node (the holder actor runs there), each node's
    holding is asked of the node itself (a task pinned to it), and the holder's links come from `spec`, the
    ClusterSpec of the whole measured cluster.

    A node seen holding the file is not asked again (for this file as it is): planning on a cluster whose nodes
    all hold the file, the usual case, costs one round of tasks per node once per process. A node that does not
    answer within `timeout_s` counts as holding nothing (the plan may then overstate its fetch, never understate
    it). only: ask just these nodes (those a plan may use: a re-plan after a loss leaves the lost ones out)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..scheduler.load_cost import Holding, WeightSources

    path = Path(model_path)
    if path.is_dir() or not ray.is_initialized():  # asking the runtime context would start a Ray instance
        return None
    st = path.stat()
    chunk = chunk_bytes_setting()
    digest = known_digest(path, chunk)
    holder = cluster.name_of(ray.get_runtime_context().get_node_id())
    nodes = [n for n in cluster.nodes() if only is None or n.name in set(only)]
    holdings: dict[str, Holding] = {}
    asked: dict[Any, Any] = {}
    probe = ray.remote(num_cpus=0, max_retries=0)(node_holding)
    for n in nodes:
        if (n.node_id, str(path), st.st_size, st.st_mtime_ns) in _HOLDS_FILE:
            holdings[n.name] = Holding(has_file=True)
            continue
        ref = probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(
            str(path), digest, chunk)
        asked[ref] = n
    if asked:
        ready, late = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
        for ref in ready:
            n = asked[ref]
            try:
                has, chunks = ray.get(ref)
            except ray.exceptions.RayError as exc:
                log.warning("weights: node %s did not say what it holds of %s: %s", n.name, path.name, exc)
                continue
            if has:
                _HOLDS_FILE.add((n.node_id, str(path), st.st_size, st.st_mtime_ns))
            holdings[n.name] = Holding(has_file=has, chunks=frozenset(chunks))
        for ref in late:
            ray.cancel(ref, force=True)
            log.warning("weights: node %s did not say within %.0f s what it holds of %s; counted as nothing",
                        asked[ref].name, timeout_s, path.name)
    links = {n: spec.link(holder, n) for n in spec.names} if spec is not None and holder in spec.names else {}
    return WeightSources(holder, holdings, file_layout(path, chunk), links)


def _prefetch_shard(model_path: str, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                    experts: tuple[int, int] | None, holder: Any, node: str) -> dict[str, Any]:
    """Run on a node: make its slice for one shard present (ensure_local), without loading it."""
    copy = ensure_local(model_path, layers, has_embedding, has_output, holder, node, experts=experts)
    wait_persisted()  # staged means on disk and recorded: a plan made next finds the chunks
    return copy.to_dict()


def prefetch(model_path: str | Path, plans: Iterable[Any], cluster: Any, poll_s: float = 0.5
             ) -> Iterator[list[dict[str, Any]]]:
    """Fetch now, without loading the model, the slices the shards of `plans` (PartitionPlans with load costs,
    scheduler/load_cost.py) would fetch at their load: one task per fetching shard, pinned to its node, each
    reporting to the holder under the plan's node name. Yields the holder's progress rows of those nodes for this
    file every `poll_s` while they run, and once more at the end; raises WeightFetchError naming the node when one
    fails. A later load of these plans (or a re-plan preferring these nodes) finds the slices cached."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..scheduler.load_cost import shard_roles

    holder = holder_actor()
    task = ray.remote(num_cpus=0, max_retries=0)(_prefetch_shard)
    refs: dict[Any, str] = {}
    for plan in plans:
        for (sh, layers, emb, out), load in zip(shard_roles(plan.stages), plan.load):
            if load.fetch_bytes:
                opts = dict(scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.node_id(sh.node), soft=False))
                refs[task.options(**opts).remote(str(model_path), layers, emb, out, sh.experts, holder, sh.node)] = sh.node
    nodes, name = set(refs.values()), Path(model_path).name
    pending = list(refs)
    while True:
        if pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise WeightFetchError(f"node {refs[ref]}: {getattr(exc, 'cause', None) or exc}") from None
                except ray.exceptions.RayError as exc:
                    raise WeightFetchError(f"node {refs[ref]}: fetching its slice of {name} failed: {exc}") from None
        rows = ray.get(holder.progress.remote()) if nodes else []
        yield [r for r in rows if r["model"] == name and r["node"] in nodes]
        if not pending:
            return
