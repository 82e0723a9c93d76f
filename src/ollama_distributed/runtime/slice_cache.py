"""A node's cache of fetched model slices (runtime/weight_fetch.py), and the table every chunk is checked against.

- `ChunkTable`: a file's per-chunk hashes (`chunk_hash`, XXH3-128), its sha256 and where its tensor data starts.
- `SliceCache`: `<root>/<digest>/model.gguf`, a sparse copy of the file holding the chunks this node fetched, and
  `chunks.json`, the chunks on its disk and verified.
- `_Persister`: fetched chunks land in the page cache through a mapping of the cache file (where the loader reads
  them); making them durable (fsync, then the record) happens behind the fetch, on a thread of its own, and never
  records a chunk before the fsync that follows its verification.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import xxhash

log = logging.getLogger(__name__)

CHUNK_HASH = "xxh3_128"  # per-chunk check (see chunk_hash)
COMMIT_BYTES = 64 << 20  # fsync and record the verified chunks this often (a kill re-fetches at most this much)
COMMIT_S = 1.0  # ... or after this long, on a slow link


class WeightFetchError(RuntimeError):
    """A slice could not be made present on a node; the message names the node, the file and the reason."""


def cache_root() -> Path:
    """Node-local cache of fetched slices (OLLAMA_DISTRIBUTED_SLICE_CACHE, else ~/.cache/ollama-distributed/slices)."""
    env = os.environ.get("OLLAMA_DISTRIBUTED_SLICE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ollama-distributed" / "slices"


# ---- the holder's side -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkTable:
    """The hash (`hash_name`) of each `chunk_bytes` piece of a file (the last one shorter), the file's own sha256
    and size, and where its tensor data starts (everything before is header: metadata and tensor infos)."""

    digest: str
    size: int
    data_offset: int
    chunk_bytes: int
    hashes: tuple[str, ...]
    hash_name: str = CHUNK_HASH  # what `hashes` are (chunk_hash)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.size)


def chunk_hash(data: Any) -> str:
    """The per-chunk check: XXH3-128 (xxhash; rsync >= 3.2 checks its blocks with the same xxh128), ~9 GB/s on one
    core here against sha256's 1 GB/s, so verifying never bounds a fetch. It guards against corruption (disk, a
    stale or lying peer, a bad transfer); who may send bytes at all is settled by the authenticated channel
    (weight_stream.py) and the table itself comes over Ray. The whole file's sha256 is still checked once, at the
    holder, against a content-addressed blob's name."""
    return xxhash.xxh3_128_hexdigest(data)


class SliceCache:
    """A node's copy of part of one file: `<root>/<digest>/model.gguf` (sparse, the file's full size) and
    `chunks.json` (the chunk indices on disk and verified: a chunk is listed only after an fsync that follows its
    verification)."""

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

    def record(self, done: set[int]) -> None:
        tmp = self._record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"chunk_bytes": self.table.chunk_bytes, "chunks": sorted(done)}))
        os.replace(tmp, self._record)

    def verify(self, indices: list[int]) -> set[int]:
        """The chunks among `indices` whose bytes on disk no longer match the table (a disk error, an edit)."""
        bad: set[int] = set()
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), self.table.size, prot=mmap.PROT_READ) as mm:
            view = memoryview(mm)
            try:
                for i in indices:
                    start, end = self.table.chunk_range(i)
                    if chunk_hash(view[start:end]) != self.table.hashes[i]:
                        bad.add(i)
            finally:
                view.release()
        return bad

    def prepare(self, missing: list[int], node: str) -> None:
        """Refuse a fetch the disk cannot hold, before the first byte; then allocate the missing chunks' blocks
        (fallocate), so a full disk surfaces here as an error and never as a fault while bytes land in the mapping."""
        need = sum(_chunk_len(self.table, i) for i in missing)
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise WeightFetchError(f"node {node}: the model slice needs {need / 1e9:.2f} GB more in "
                                   f"{self.dir}, only {free / 1e9:.2f} GB free (set OLLAMA_DISTRIBUTED_SLICE_CACHE "
                                   "to a larger disk)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        try:
            if os.fstat(fd).st_size != self.table.size:
                os.ftruncate(fd, self.table.size)  # sparse: holes cost no disk
            for start, end in _runs(self.table, missing):
                os.posix_fallocate(fd, start, end - start)
        except OSError as e:
            raise WeightFetchError(f"node {node}: cannot write the model slice to {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)

    def lock(self) -> _CacheLock:
        """Held while a node's shard fetches (shards of one node that share the file fetch one after another),
        and until the fetched chunks are on disk and recorded."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return _CacheLock(self.dir / ".lock")


class _CacheLock:
    def __init__(self, path: Path) -> None:
        self._f = open(path, "w")
        fcntl.flock(self._f, fcntl.LOCK_EX)

    def release(self) -> None:
        if not self._f.closed:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()


def _runs(table: ChunkTable, indices: list[int]) -> Iterator[tuple[int, int]]:
    """Byte ranges of consecutive chunks."""
    run: list[int] | None = None
    for i in sorted(indices):
        start, end = table.chunk_range(i)
        if run is not None and run[1] == start:
            run[1] = end
        else:
            if run is not None:
                yield run[0], run[1]
            run = [start, end]
    if run is not None:
        yield run[0], run[1]


class _Persister:
    """Makes verified chunks durable behind the fetch, off its critical path: every COMMIT_BYTES or COMMIT_S it
    fsyncs the cache file and only then adds the chunks verified before that fsync to `chunks.json`, so a crash or
    a kill loses at most the chunks since the last commit and never leaves one recorded that the disk does not
    hold. `close()` returns at once; the last commit and the cache lock's release follow on its thread
    (`wait_persisted` waits for them)."""

    def __init__(self, cache: SliceCache, done: set[int], lock: _CacheLock) -> None:
        self._cache, self._done, self._lock = cache, done, lock
        self._fd = os.open(cache.path, os.O_RDWR)
        self._cv = threading.Condition()
        self._new: list[int] = []
        self._closed = False
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="slice-cache-persist", daemon=True)
        self._thread.start()

    def add(self, index: int) -> None:
        with self._cv:
            self._new.append(index)
            if len(self._new) * self._cache.table.chunk_bytes >= COMMIT_BYTES:
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._closed or len(self._new) * self._cache.table.chunk_bytes
                                      >= COMMIT_BYTES, timeout=COMMIT_S)
                    batch, self._new, closed = self._new, [], self._closed
                if batch:
                    t0 = time.perf_counter()
                    os.fsync(self._fd)  # the batch's bytes were written into the mapping before: now on disk
                    self._done.update(batch)
                    self._cache.record(self._done)
                    log.debug("weights: %d chunks of %s on disk (fsync and record %.3f s)", len(batch),
                              self._cache.path, time.perf_counter() - t0)
                if closed:
                    return
        except OSError as exc:  # the chunks stay unrecorded: the next load fetches them again
            self.error = exc
            log.error("weights: cannot keep the fetched chunks in %s: %s", self._cache.path, exc)
        finally:
            os.close(self._fd)
            self._lock.release()
            self.finished.set()


_persisting: list[_Persister] = []


def wait_persisted(timeout_s: float | None = None) -> None:
    """Wait until the chunks this process fetched are on disk and recorded (a shard's load calls it after it has
    read its weights, which it does meanwhile; a prefetch before it reports done)."""
    while _persisting:
        p = _persisting[0]
        p.finished.wait(timeout_s)
        if not p.finished.is_set():
            return
        _persisting.pop(0)


def _chunk_len(table: ChunkTable, index: int) -> int:
    start, end = table.chunk_range(index)
    return end - start
