"""Weights reach the nodes: a shard whose node lacks the model file fetches exactly its own tensors' bytes.

Every shard reads only its slice of a GGUF (model/weights.py memory-maps the file and copies out its tensors), so
a node without the file needs only the file's header and the byte ranges of the tensors its shard reads, not the
whole 10-100 GB. This module moves those ranges:

- The holder (`WeightHolder`, a Ray actor pinned to the node that has the file: the server's) splits the file into
  fixed chunks and hashes each one (`ChunkTable`, sha256; one sequential pass, kept in a sidecar so a restart
  reuses it). A content-addressed blob (`sha256-<hex>`, the model store's name) must also match its own name, so
  a corrupt holder file is refused rather than served.
- The fetcher (`ensure_local`, run by the shard worker before it loads) asks for the chunks covering its tensors,
  checks each against the holder's table (a mismatch is fetched once more, then refused with the chunk named), and
  writes them at their own offsets into a sparse copy of the file in a node-local cache keyed by the file's digest
  (`<cache>/<digest>/model.gguf`, plus `chunks.json`, the verified chunks). The loader then opens that copy like
  any GGUF: the header is there and every tensor it reads is there; the holes are tensors of other shards. A
  re-plan, restart or recovery on that node reuses what is cached; an interrupted transfer resumes where it
  stopped, because only verified chunks are recorded; a full disk is refused before the first byte (and ENOSPC
  mid-way leaves the chunk unrecorded), never a half-written model taken as whole.

Transport: Ray's object store (the holder returns each chunk as bytes; Ray moves them between nodes' object
stores and pipelines several in flight). Ray's cluster is the trust boundary: whoever can call the holder can
already run code on every node, so the holder adds no secret of its own; nothing is served on an HTTP port. With
RAY_AUTH_MODE=token, Ray 2.60 demands the cluster's token on every RPC on this path (the actor calls and the object
manager's Push/Pull between nodes: a Pull without it is refused, tests/runtime/test_weight_fetch.py); RAY_USE_TLS=1
encrypts them. The token alone does not encrypt.

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

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..scheduler.load_cost import FileLayout, TensorExtent, chunks_covering
from ..scheduler.load_cost import shard_chunks as layout_chunks
from ..scheduler.load_cost import shard_tensor_names  # noqa: F401 - the fetcher's rule, re-exported for its callers

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # verified unit: large enough that per-call overhead is small, small enough to resume cheaply
COMMIT_BYTES = 64 << 20  # fsync and record the verified chunks this often (a kill re-fetches at most this much)
COMMIT_S = 1.0  # ... or after this long, on a slow link
IN_FLIGHT = 8  # chunks requested at once: keeps the link busy while one is verified and written
_BLOB_NAME = re.compile(r"^sha256[-:]([0-9a-f]{64})$")


class WeightFetchError(RuntimeError):
    """A slice could not be made present on a node; the message names the node, the file and the reason."""


def cache_root() -> Path:
    """Node-local cache of fetched slices (OLLAMA_DISTRIBUTED_SLICE_CACHE, else ~/.cache/ollama-distributed/slices)."""
    env = os.environ.get("OLLAMA_DISTRIBUTED_SLICE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ollama-distributed" / "slices"


# ---- the holder's side -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkTable:
    """sha256 of each `chunk_bytes` piece of a file (the last one shorter), the file's own sha256 and size, and
    where its tensor data starts (everything before is header: metadata and tensor infos)."""

    digest: str
    size: int
    data_offset: int
    chunk_bytes: int
    hashes: tuple[str, ...]

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.size)


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
            hashes.append(hashlib.sha256(block).hexdigest())
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
        tmp.write_text(json.dumps(dict(asdict(table), mtime_ns=st.st_mtime_ns)))
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
        if saved["size"] == st.st_size and saved["mtime_ns"] == st.st_mtime_ns:
            return ChunkTable(saved["digest"], saved["size"], saved["data_offset"], saved["chunk_bytes"],
                              tuple(saved["hashes"]))
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
        self._t0 = time.monotonic()

    def table(self, path: str) -> ChunkTable:
        if os.path.isdir(path):
            raise WeightFetchError(f"{path} is a directory (a Hugging Face model): only GGUF files are fetched "
                                   "by nodes that lack them; place the directory on every node")
        with self._lock:  # one pass per file even when several shards ask at once
            st = os.stat(path)
            key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
            if key not in self._tables:
                self._tables[key] = chunk_table(path, self.chunk_bytes)
            return self._tables[key]

    def shard_chunks(self, path: str, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                     experts: tuple[int, int] | None) -> list[int]:
        return shard_chunks(path, layers, has_embedding, has_output, experts, self.chunk_bytes)

    def read(self, path: str, start: int, end: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        with self._lock:
            self._served += len(data)
            due = self._t0 + self._served / self.max_bytes_per_s if self.max_bytes_per_s > 0 else 0.0
        time.sleep(max(0.0, due - time.monotonic()))
        return data

    def served_bytes(self) -> int:
        return self._served

    def report(self, node: str, model: str, done: int, total: int, rate: float, state: str) -> None:
        eta = (total - done) / rate if rate > 0 and done < total else 0.0
        self._progress[(node, model)] = dict(node=node, model=model, bytes_done=done, bytes_total=total,
                                            bytes_per_s=round(rate), eta_s=round(eta, 1), state=state,
                                            updated=time.time())

    def progress(self) -> list[dict[str, Any]]:
        return sorted(self._progress.values(), key=lambda r: (r["model"], r["node"]))


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

    def read(self, digest: str, start: int, end: int) -> bytes:
        with open(cache_root() / digest / "model.gguf", "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        with self._lock:
            self._served += len(data)
        return data

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


class SliceCache:
    """A node's copy of part of one file: `<root>/<digest>/model.gguf` (sparse, the file's full size) and
    `chunks.json` (the chunk indices written and verified)."""

    def __init__(self, table: ChunkTable, root: Path | None = None) -> None:
        self.table = table
        self.dir = (root or cache_root()) / table.digest
        self.path = self.dir / "model.gguf"
        self._record = self.dir / "chunks.json"

    def present(self) -> set[int]:
        try:
            saved = json.loads(self._record.read_text())
        except (OSError, ValueError):
            return set()
        if saved.get("chunk_bytes") != self.table.chunk_bytes or not self.path.exists():
            return set()
        return set(saved["chunks"])

    def prepare(self, missing_bytes: int, node: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        if missing_bytes > free:
            raise WeightFetchError(f"node {node}: the model slice needs {missing_bytes / 1e9:.2f} GB more in "
                                   f"{self.dir}, only {free / 1e9:.2f} GB free (set OLLAMA_DISTRIBUTED_SLICE_CACHE "
                                   "to a larger disk)")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        try:
            os.ftruncate(fd, self.table.size)  # sparse: holes cost no disk
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def writer(self, done: set[int]) -> Iterator[Callable[[int, bytes], None]]:
        """`put(index, data)` writes a verified chunk at its offset; every COMMIT_BYTES or COMMIT_S, and on leaving
        (also by an error), the file is fsynced and only then are its chunks added to `done` and the record: a crash or a kill
        loses at most the chunks since the last commit, and never records a chunk the disk does not hold."""
        fd = os.open(self.path, os.O_WRONLY)
        unsaved: list[int] = []
        last = [time.monotonic()]

        def commit() -> None:
            last[0] = time.monotonic()
            if unsaved:
                os.fsync(fd)
                done.update(unsaved)
                unsaved.clear()
                tmp = self._record.with_suffix(".tmp")
                tmp.write_text(json.dumps({"chunk_bytes": self.table.chunk_bytes, "chunks": sorted(done)}))
                os.replace(tmp, self._record)

        def put(index: int, data: bytes) -> None:
            os.pwrite(fd, data, index * self.table.chunk_bytes)
            unsaved.append(index)
            if len(unsaved) * self.table.chunk_bytes >= COMMIT_BYTES or time.monotonic() - last[0] > COMMIT_S:
                commit()

        try:
            yield put
        finally:
            try:
                commit()
            finally:
                os.close(fd)


@dataclass(frozen=True)
class LocalCopy:
    """Where a shard reads its weights on this node, and what it took to get them there."""

    path: str
    fetched_bytes: int = 0  # moved over the network for this load
    slice_bytes: int = 0  # the chunks this shard needs (header included); 0 when the node has the file
    seconds: float = 0.0  # the transfer: from the first chunk asked for to the last written and recorded
    table_s: float = 0.0  # waiting for the holder's chunk table (its one pass over the file, the first time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_local(model_path: str, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                 holder: Any, node: str, cache_dir: Path | None = None,
                 experts: tuple[int, int] | None = None) -> LocalCopy:
    """A path on this node holding every byte this shard reads of `model_path`: the file itself where this node
    has it, else the slice cache, completed from `holder` (a WeightHolder actor handle). `experts`: the MoE
    experts [start, end) the shard holds (None: all)."""
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
    with cache.locked():  # shards of one node that share the file fetch it one after another, each its own part
        done = cache.present()
        missing = [i for i in need if i not in done]
        total = sum(_chunk_len(table, i) for i in need)
        fetched = sum(_chunk_len(table, i) for i in missing)
        cache.prepare(fetched, node)
        if missing:
            _fetch(cache, missing, holder, model_path, node, done, base=total - fetched, total=total, peers=peers)
        else:
            holder.report.remote(node, Path(model_path).name, total, total, 0.0, "cached")
    return LocalCopy(str(cache.path), fetched, total, time.perf_counter() - t0, t0 - t_table)


def _chunk_len(table: ChunkTable, index: int) -> int:
    start, end = table.chunk_range(index)
    return end - start


def _fetch(cache: SliceCache, indices: list[int], holder: Any, model_path: str, node: str, done: set[int],
           base: int, total: int, peers: tuple[tuple[Any, frozenset[int]], ...] = ()) -> None:
    """Fetch, verify and write `indices`, IN_FLIGHT at a time; a chunk whose hash does not match is asked for once
    more (of the holder), then refused. A chunk that peers hold (SlicePeer: nodes that fetched it before) is asked
    of the holder and those peers in turn, so the holder's link carries only a share of it; every chunk is checked
    against the holder's table whoever sent it."""
    import ray

    table, name = cache.table, Path(model_path).name
    got, t0, last_report = 0, time.perf_counter(), 0.0
    queue = list(indices)
    retried: set[int] = set()
    pending: dict[Any, int] = {}
    turn = 0
    with cache.writer(done) as put:
        while queue or pending:
            while queue and len(pending) < IN_FLIGHT:
                i = queue.pop(0)
                start, end = table.chunk_range(i)
                sources = [None] + [p for p, held in peers if i in held] if i not in retried else [None]
                source = sources[turn % len(sources)]
                turn += 1
                ref = (holder.read.remote(model_path, start, end) if source is None
                       else source.read.remote(table.digest, start, end))
                pending[ref] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            data = ray.get(ready[0])
            if hashlib.sha256(data).hexdigest() != table.hashes[i]:
                if i in retried:
                    raise WeightFetchError(
                        f"node {node}: chunk {i} of {model_path} (bytes {table.chunk_range(i)[0]}-"
                        f"{table.chunk_range(i)[1]}) does not match its sha256 from the holder's table twice: the "
                        "holder's file changed or is corrupt; refused")
                log.warning("weights: chunk %d of %s failed verification; fetching it again", i, name)
                retried.add(i)
                queue.insert(0, i)
                continue
            try:
                put(i, data)
            except OSError as e:
                raise WeightFetchError(f"node {node}: cannot write the model slice to {cache.path}: "
                                       f"{e.strerror}") from None
            got += len(data)
            now = time.perf_counter()
            if now - last_report > 0.5 or not (queue or pending):
                rate = got / max(now - t0, 1e-6)
                state = "done" if not (queue or pending) else "fetching"
                holder.report.remote(node, name, base + got, total, rate, state)
                log.info("weights: node %s %s %.0f/%.0f MB at %.0f MB/s", node, name, (base + got) / 1e6,
                         total / 1e6, rate / 1e6)
                last_report = now


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
    return ensure_local(model_path, layers, has_embedding, has_output, holder, node, experts=experts).to_dict()


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
