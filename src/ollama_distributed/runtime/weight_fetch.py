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
already run code on every node, so the holder adds no secret of its own; nothing is served on an HTTP port.

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
    key = hashlib.sha256(f"{p.resolve()}|{chunk_bytes}".encode()).hexdigest()[:24]
    sidecar = (sidecar_dir or cache_root() / "tables") / f"{key}.json"
    try:
        saved = json.loads(sidecar.read_text())
        if saved["size"] == st.st_size and saved["mtime_ns"] == st.st_mtime_ns:
            return ChunkTable(saved["digest"], saved["size"], saved["data_offset"], saved["chunk_bytes"],
                              tuple(saved["hashes"]))
    except (OSError, ValueError, KeyError):
        pass
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


# ---- the fetcher's side ----------------------------------------------------------------------------------------
def shard_tensor_names(names: Iterable[str], layers: tuple[int, int], has_embedding: bool, has_output: bool) -> list[str]:
    """The tensors a shard reads (llama.cpp's naming, every family): its layers' `blk.N.*`, the embedding on the
    first stage (and on the last when the head is tied to it), the head on the last stage, and the small global
    tensors (output_norm, rope_freqs, ...) everywhere."""
    names = list(names)
    tied = "output.weight" not in names
    out = []
    for name in names:
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            keep = layers[0] <= int(m.group(1)) < layers[1]
        elif name.startswith("token_embd."):
            keep = has_embedding or (has_output and tied)
        elif name.startswith("output."):
            keep = has_output
        else:
            keep = True
        if keep:
            out.append(name)
    return out


def tensor_ranges(tensors: Iterable[Any], wanted: set[str], experts: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Byte ranges of the wanted tensors (gguf ReaderTensor-like: name, data_offset, n_bytes, shape in ggml order).
    A stacked expert tensor (`ffn_*_exps`, ggml shape [in, out, n_expert]: experts outermost, so each expert's
    matrix is one contiguous run) contributes only the run of the shard's experts [start, end)."""
    out = []
    for t in tensors:
        if t.name not in wanted:
            continue
        start, n = int(t.data_offset), int(t.n_bytes)
        if experts is not None and re.search(r"\.ffn_(gate|up|down)_exps\.", t.name):
            per_expert = n // int(t.shape[-1])
            out.append((start + experts[0] * per_expert, start + experts[1] * per_expert))
        else:
            out.append((start, start + n))
    return out


def chunks_for(ranges: Iterable[tuple[int, int]], table: ChunkTable) -> list[int]:
    """Indices of the chunks that cover the byte ranges, and the header's."""
    need = set(range(0, (table.data_offset + table.chunk_bytes - 1) // table.chunk_bytes or 1))
    for start, end in ranges:
        if end > start:
            need.update(range(start // table.chunk_bytes, (end - 1) // table.chunk_bytes + 1))
    return sorted(i for i in need if i * table.chunk_bytes < table.size)


def shard_chunks(path: str | Path, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                 experts: tuple[int, int] | None = None, chunk_bytes: int = CHUNK_BYTES) -> list[int]:
    """The chunks a node without the file needs for this shard (its tensors' and the header's), from the header
    alone: the holder answers this, so the fetching node asks for everything in one pipelined run."""
    from ..model.gguf_index import GGUFIndex

    index = GGUFIndex(path)
    table = ChunkTable("", Path(path).stat().st_size, index.data_offset, chunk_bytes, ())
    wanted = set(shard_tensor_names((t.name for t in index.tensors), layers, has_embedding, has_output))
    return chunks_for(tensor_ranges(index.tensors, wanted, experts), table)


def slice_bytes(path: str | Path, layers: tuple[int, int], has_embedding: bool, has_output: bool,
                experts: tuple[int, int] | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Bytes a node without the file fetches for this shard (whole chunks, header included): what a plan costs
    in transfer before it can run."""
    size = Path(path).stat().st_size
    return sum(min(chunk_bytes, size - i * chunk_bytes)
               for i in shard_chunks(path, layers, has_embedding, has_output, experts, chunk_bytes))


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
            _fetch(cache, missing, holder, model_path, node, done, base=total - fetched, total=total)
        else:
            holder.report.remote(node, Path(model_path).name, total, total, 0.0, "cached")
    return LocalCopy(str(cache.path), fetched, total, time.perf_counter() - t0, t0 - t_table)


def _chunk_len(table: ChunkTable, index: int) -> int:
    start, end = table.chunk_range(index)
    return end - start


def _fetch(cache: SliceCache, indices: list[int], holder: Any, model_path: str, node: str, done: set[int],
           base: int, total: int) -> None:
    """Fetch, verify and write `indices`, IN_FLIGHT at a time; a chunk whose hash does not match is asked for once
    more, then refused."""
    import ray

    table, name = cache.table, Path(model_path).name
    got, t0, last_report = 0, time.perf_counter(), 0.0
    queue = list(indices)
    retried: set[int] = set()
    pending: dict[Any, int] = {}
    with cache.writer(done) as put:
        while queue or pending:
            while queue and len(pending) < IN_FLIGHT:
                i = queue.pop(0)
                pending[holder.read.remote(model_path, *table.chunk_range(i))] = i
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
