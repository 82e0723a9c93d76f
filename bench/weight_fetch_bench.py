"""Weight fetch (runtime/weight_fetch.py): a node without the model file, on loopback, vs the link it has.

Run as root (it makes a mount namespace): `python bench/weight_fetch_bench.py [--chunk-mib 8]`. It starts a local Ray
head (the holder's node), joins a second raylet from its own mount namespace with an empty tmpfs over the bundled
SmolLM2's directory (so that node cannot see the file), and measures, in one run:
  1. the link: a single TCP stream over 127.0.0.1 (the path the fetch's stream takes between two nodes here),
     bytes/s of 1 GiB sent through a socket pair of processes; and the stream's ceiling (`stream_ceiling_MBps`):
     the weight stream itself (sendfile, requests ahead, each chunk hashed) into one reused buffer, landing nowhere;
     and the landing's ceiling (`cache_write_MBps`): new pages written into a fresh file in the slice cache's
     directory, as the fetch lands its chunks (an mmap of the file, each chunk faulted in and filled), no network;
  2. the fetch: the whole model as one shard on the node without the file (every chunk fetched, verified and
     written), bytes/s, against 1. (the holder's one-time hashing pass is timed apart);
  3. time to first token of that node's shard, cold (empty slice cache) vs warm (cached: its chunks are only
     checked against the table again, `warm_verify_s`), through RayExecutor.
The fetch's transport (`stream`: the holder's socket, runtime/weight_stream.py; `ray`: the object-store fallback)
is printed with it.
Prints one JSON object. The machine's other load skews every figure: check `top` first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ollama_distributed.model.bundled import bundled_model_path
from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.cluster import ClusterHandle
from ollama_distributed.runtime.placement import uniform_plan
from ollama_distributed.runtime.ray_executor import RayExecutor
from ollama_distributed.runtime.weight_fetch import holder_actor

NODE = "nofile"
_RAY_START_LOOPBACK = (
    "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda a: a; "
    "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()"
)


def _sink(port: int, total: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        buf = bytearray(8 << 20)
        while got < total:
            n = s.recv_into(buf)
            if not n:
                break
            got += n


def tcp_loopback_bytes_per_s(total: int = 1 << 30) -> float:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        proc = mp.Process(target=_sink, args=(srv.getsockname()[1], total))
        proc.start()
        conn, _ = srv.accept()
        block = os.urandom(8 << 20)
        t0 = time.perf_counter()
        sent = 0
        with conn:
            while sent < total:
                conn.sendall(block)
                sent += len(block)
        proc.join()
        return total / (time.perf_counter() - t0)


def stream_ceiling_bytes_per_s(path: Path, chunk: int, in_flight: int = 8, rounds: int = 3) -> float:
    """The weight stream alone (runtime/weight_stream.py, a ChunkServer in another process sending the file with
    sendfile), received into one reused buffer and each chunk hashed (XXH3-128), as the fetch does but landing
    nowhere: what the protocol and the check cost against the link, apart from filling new memory. Best of rounds."""
    import xxhash

    from ollama_distributed.runtime import weight_stream

    # the server's endpoint (its secret) is made in the child: take it over a pipe of our own
    parent, child = mp.Pipe()
    proc = mp.Process(target=_serve_endpoint, args=(str(path), child), daemon=True)
    proc.start()
    ep = parent.recv()
    size = path.stat().st_size
    n = size // chunk
    buf = memoryview(bytearray(chunk))
    best = 0.0
    try:
        for _ in range(rounds):
            s = weight_stream.ChunkStream(ep)
            t0, sent = time.perf_counter(), 0
            for k in range(n):
                while sent < n and sent - k < in_flight:
                    s.request("0" * 64, sent * chunk, chunk)
                    sent += 1
                s.receive_into(buf)
                xxhash.xxh3_128_hexdigest(buf)
            best = max(best, n * chunk / (time.perf_counter() - t0))
            s.close()
    finally:
        proc.kill()
    return best


def cache_write_bytes_per_s(directory: Path, size: int, chunk: int) -> float:
    """Bytes/s of landing `size` bytes in a new file under `directory` the way the fetch lands chunks (a shared
    mapping of a sparse, fallocated file; each chunk's pages faulted in with MADV_POPULATE_WRITE, then filled).
    What the file system's page cache takes, apart from the network; the disk is not waited for (no fsync)."""
    import mmap

    from ollama_distributed.runtime.weight_fetch import _populate

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "landing-probe"
    block = memoryview(os.urandom(chunk))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        with mmap.mmap(fd, size) as mm:
            view = memoryview(mm)
            t0 = time.perf_counter()
            for start in range(0, size, chunk):
                n = min(chunk, size - start)
                _populate(mm, start, start + n)  # the fetch's own fault-in (MADV_POPULATE_WRITE)
                view[start:start + n] = block[:n]
            rate = size / (time.perf_counter() - t0)
            view.release()
        return rate
    finally:
        os.close(fd)
        path.unlink()


def _serve_endpoint(path: str, conn) -> None:
    from ollama_distributed.runtime.weight_stream import ChunkServer

    server = ChunkServer({"0" * 64: path}.get, lambda n: None, lambda n: None, "127.0.0.1")
    conn.send(server.endpoint)
    time.sleep(600)  # killed by the parent


def join_node(cluster: ClusterHandle, hidden: Path, cache: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_TMPDIR=cluster.temp_dir,
               RAY_USAGE_STATS_ENABLED="0", OLLAMA_DISTRIBUTED_SLICE_CACHE=str(cache))
    start = [sys.executable, "-c", _RAY_START_LOOPBACK, "start", f"--address={cluster.address}",
             "--node-ip-address=127.0.0.1", "--num-cpus=1", '--resources={"od_memory_mib": 4096}',
             f"--labels=ollama-distributed.io/node={NODE}", "--block", "--disable-usage-stats"]
    script = f"mount -t tmpfs tmpfs {shlex.quote(str(hidden))} && exec {shlex.join(start)}"
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while not any(n.name == NODE for n in cluster.nodes()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the node did not join: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def first_token_s(plan, path: Path, cluster: ClusterHandle) -> tuple[float, dict]:
    t0 = time.perf_counter()
    ex = RayExecutor(plan, path, cluster, max_seq_len=64)
    try:
        ex.step([0], [[1, 504, 3145, 282]])
        elapsed = time.perf_counter() - t0
        fetched = [sh.get("weights_fetched") for st in ex.placement()["stages"] for sh in st["shards"]]
        return elapsed, fetched[0] or {}
    finally:
        ex.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--cache-in", default=None, help="put the node's slice cache under this directory (e.g. /dev/shm, "
                    "a tmpfs: no writeback) instead of the bench's temporary directory on disk")
    args = ap.parse_args()
    os.environ["OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES"] = str(args.chunk_mib << 20)
    path = bundled_model_path("smollm2:135m")
    # The holder must see the file, the other node must not: hide a copy under a directory of our own.
    work = Path(tempfile.mkdtemp(prefix="od-fetch-bench-"))
    store = work / "store"
    store.mkdir()
    model = store / path.name
    shutil.copyfile(path, model)
    cache = (Path(tempfile.mkdtemp(prefix="od-fetch-cache-", dir=args.cache_in)) if args.cache_in
             else work / "node-cache")
    os.sync()  # the copy's ~100 MB of dirty pages reach the disk before, not during, the fetch's own writes
    out: dict = {"model": path.name, "bytes": model.stat().st_size, "chunk_mib": args.chunk_mib,
                 "cache_fs": _fs_type(cache.parent)}
    out["tcp_loopback_MBps"] = round(tcp_loopback_bytes_per_s() / 1e6)
    out["stream_ceiling_MBps"] = round(stream_ceiling_bytes_per_s(model, args.chunk_mib << 20) / 1e6)
    out["cache_write_MBps"] = round(cache_write_bytes_per_s(cache.parent, out["bytes"], args.chunk_mib << 20) / 1e6)
    cluster = ClusterHandle.start_local(1, "4GiB")
    proc = None
    try:
        proc = join_node(cluster, store, cache, work / "ray-start.log")
        plan = uniform_plan(read_config(model), [[NODE]], "smollm2")
        import ray

        # the holder's one pass over the file (sha256 of the file, XXH3-128 per chunk), kept for later fetches
        t0 = time.perf_counter()
        ray.get(holder_actor().table.remote(str(model)))
        out["holder_table_s"] = round(time.perf_counter() - t0, 2)
        cold_s, fetched = first_token_s(plan, model, cluster)
        warm_s, warm = first_token_s(plan, model, cluster)
        rate = fetched["fetched_bytes"] / fetched["seconds"]
        out.update(transport=fetched["transport"], fetch_bytes=fetched["fetched_bytes"],
                   fetch_s=round(fetched["seconds"], 3),
                   fetch_MBps=round(rate / 1e6), fetch_vs_link=round(rate / (out["tcp_loopback_MBps"] * 1e6), 3),
                   first_token_cold_s=round(cold_s, 2), first_token_warm_s=round(warm_s, 2),
                   warm_verify_s=round(warm.get("verify_s", 0.0), 3))
        print(json.dumps(out, indent=2))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def _fs_type(path: Path) -> str:
    """The file system holding `path` (/proc/mounts: the longest mount point above it)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, fs = line.split()[:3]
        if str(path.resolve()).startswith(point) and len(point) > len(best):
            best, kind = point, fs
    return kind


if __name__ == "__main__":
    main()
