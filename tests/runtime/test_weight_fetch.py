"""Weights reach a node that lacks the model file (runtime/weight_fetch.py), on a real Ray node that cannot see it.

The node is a real raylet (`ray start --address ...`) joined to the session's cluster from its own mount namespace
(`unshare --mount`), where an empty tmpfs covers the model's directory: its processes see no model file, as a
machine without the model store. Its shard fetches only its tensors' chunks from the holder on the head node; the
output must equal the in-process engine's; a transfer killed mid-way resumes from what was verified; a byte
flipped in the holder's file is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.placement import uniform_plan
from ollama_distributed.runtime.ray_executor import RayExecutor
from ollama_distributed.runtime.weight_fetch import (ChunkTable, SliceCache, WeightFetchError, WeightHolder, chunk_table,
                                                     chunks_for, shard_tensor_names, slice_bytes)

pytestmark = pytest.mark.slow

CHUNK = 256 << 10  # small chunks, so a tiny model has many and a shard's part is visibly less than the file
NODE = "nofile"
NODE2 = "nofile2"
_RAY_START_LOOPBACK = (  # as tests/api/test_fault_tolerance.py: `ray start` that stays on 127.0.0.1
    "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda a: a; "
    "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()"
)


# ---- pure parts ------------------------------------------------------------------------------------------------
def test_shard_tensor_names_per_stage() -> None:
    names = ["token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight",
             "blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.2.ffn_down.weight", "blk.10.ffn_up.weight"]
    assert shard_tensor_names(names, (0, 2), True, False) == [
        "token_embd.weight", "output_norm.weight", "rope_freqs.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight"]
    assert shard_tensor_names(names, (2, 11), False, True) == [
        "output_norm.weight", "output.weight", "rope_freqs.weight", "blk.2.ffn_down.weight", "blk.10.ffn_up.weight"]
    tied = [n for n in names if n != "output.weight"]  # the head is the embedding: the last stage needs it
    assert "token_embd.weight" in shard_tensor_names(tied, (2, 11), False, True)


def test_chunks_cover_ranges_and_header() -> None:
    table = ChunkTable("d", size=1000, data_offset=250, chunk_bytes=100, hashes=("h",) * 10)
    assert chunks_for([], table) == [0, 1, 2]  # the header: [0, 250)
    assert chunks_for([(500, 501), (699, 701), (950, 1000)], table) == [0, 1, 2, 5, 6, 7, 9]


def test_chunk_table_refuses_a_blob_that_does_not_match_its_name(tmp_path, tiny_gguf) -> None:
    data = tiny_gguf.read_bytes()
    good = tmp_path / f"sha256-{hashlib.sha256(data).hexdigest()}"
    good.write_bytes(data)
    table = chunk_table(good, CHUNK, sidecar_dir=tmp_path / "tables")
    assert table.digest == hashlib.sha256(data).hexdigest() and table.size == len(data)
    assert len(table.hashes) == -(-len(data) // CHUNK)
    bad = tmp_path / f"sha256-{'0' * 64}"
    bad.write_bytes(data)
    with pytest.raises(Exception, match="corrupt"):
        chunk_table(bad, CHUNK, sidecar_dir=tmp_path / "tables")


def test_a_full_disk_is_refused_before_the_first_byte(tmp_path) -> None:
    table = ChunkTable("ab" * 32, size=1 << 50, data_offset=100, chunk_bytes=1 << 40, hashes=())
    cache = SliceCache(table, tmp_path)
    with pytest.raises(WeightFetchError, match=r"node n1: the model slice needs .* GB more in .* GB free"):
        cache.prepare(list(range(1024)), "n1")
    assert not cache.path.exists()


class _Unpicklable(Exception):
    def __init__(self, path: str, reason: str) -> None:  # the args Exception keeps are not the constructor's
        super().__init__(f"{path}: {reason}")


def test_an_error_ray_cannot_rebuild_arrives_as_its_text() -> None:
    """A worker error whose class cannot be unpickled from its args reached the driver as Ray's "Failed to
    deserialize exception"; it now leaves the actor as a RuntimeError carrying its type and message, and errors
    that do round-trip (ModelFileError included) keep their type."""
    from ollama_distributed.model.errors import ModelFileError
    from ollama_distributed.runtime.worker import _portable_errors

    class W:
        @_portable_errors
        def load(self, exc):
            raise exc

    with pytest.raises(RuntimeError, match=r"^_Unpicklable: /models/x.gguf: no such file$") as info:
        W().load(_Unpicklable("/models/x.gguf", "no such file"))
    assert type(info.value) is RuntimeError
    with pytest.raises(ModelFileError, match="/m.gguf: missing"):
        W().load(ModelFileError("/m.gguf", "missing"))


# ---- a real node that cannot see the file ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_store(tmp_path_factory, tiny_gguf) -> Path:
    """The tiny model as a content-addressed blob, in a directory the node without the file cannot see."""
    store = tmp_path_factory.mktemp("store")
    data = tiny_gguf.read_bytes()
    blob = store / f"sha256-{hashlib.sha256(data).hexdigest()}"
    blob.write_bytes(data)
    return blob


@pytest.fixture(scope="module")
def node_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nofile-cache")


@pytest.fixture(scope="module")
def nofile_node(ray_cluster, model_store, node_cache, tmp_path_factory):
    """A raylet joined to the session cluster from its own mount namespace, the model's directory hidden under an
    empty tmpfs. Removed (its process group killed) at the end, so later tests see the usual 4 nodes."""
    with _joined_without_the_file(ray_cluster, NODE, model_store, node_cache, tmp_path_factory):
        yield NODE


@contextlib.contextmanager
def _joined_without_the_file(ray_cluster, name: str, model_store: Path, cache: Path, tmp_path_factory):
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs util-linux unshare and the right to make a mount namespace (root or CAP_SYS_ADMIN)")
    log_path = tmp_path_factory.mktemp(f"{name}-log") / "ray-start.log"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_TMPDIR=ray_cluster.temp_dir,
               RAY_USAGE_STATS_ENABLED="0", OLLAMA_DISTRIBUTED_SLICE_CACHE=str(cache))
    start = [sys.executable, "-c", _RAY_START_LOOPBACK, "start", f"--address={ray_cluster.address}",
             "--node-ip-address=127.0.0.1", "--num-cpus=1", '--resources={"od_memory_mib": 2048}',
             f"--labels=ollama-distributed.io/node={name}", "--block", "--disable-usage-stats"]
    script = f"mount -t tmpfs tmpfs {shlex.quote(str(model_store.parent))} && exec {shlex.join(start)}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not any(n.name == name for n in ray_cluster.nodes()):
            assert proc.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.5)
        yield name
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(n.name == name for n in ray_cluster.nodes()) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def small_chunks():
    """The holder the executor starts reads its chunk size from the driver's environment."""
    old = os.environ.get("OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES")
    os.environ["OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES"] = str(CHUNK)
    yield
    if old is None:
        os.environ.pop("OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES")
    else:
        os.environ["OLLAMA_DISTRIBUTED_WEIGHT_CHUNK_BYTES"] = old


def _greedy(ex, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    logits = ex.step([0], [prompt])
    first = logits[0].clone()
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits = ex.step([0], [[out[-1]]])
    ex.free(0)
    return out, first


def _cached_chunks(node_cache: Path, digest: str) -> set[int]:
    try:
        return set(json.loads((node_cache / digest / "chunks.json").read_text())["chunks"])
    except FileNotFoundError:
        return set()


def test_node_without_the_file_fetches_its_slice(ray_cluster, nofile_node, model_store, node_cache) -> None:
    import ray

    probe = _worker(ray_cluster, NODE)
    assert not ray.get(probe.has_file.remote(str(model_store)))  # the node really lacks it
    ray.kill(probe)
    ref_ex = LocalExecutor(model_store, max_seq_len=64)
    ref_tokens, ref_logits = _greedy(ref_ex, [1, 17, 42, 99, 7], 8)
    ref_ex.close()

    cfg = read_config(model_store)
    ex = RayExecutor(uniform_plan(cfg, [["node0"], [NODE]], "tiny"), model_store, ray_cluster, max_seq_len=64)
    try:
        tokens, logits = _greedy(ex, [1, 17, 42, 99, 7], 8)
        fetched = [sh.get("weights_fetched") for st in ex.placement()["stages"] for sh in st["shards"]]
    finally:
        ex.close()
    assert tokens == ref_tokens
    assert fetched[0] is None and 0 < fetched[1]["fetched_bytes"] == fetched[1]["slice_bytes"], fetched
    assert fetched[1]["transport"] == "stream", fetched  # the holder's socket (weight_stream.py), not Ray's objects
    # what the driver predicts from the header before loading (and logs) is what the node fetched
    assert fetched[1]["slice_bytes"] == slice_bytes(model_store, (cfg.n_layers // 2, cfg.n_layers), False, True,
                                                    chunk_bytes=CHUNK)
    err = (logits - ref_logits).abs().max().item() / max(1.0, ref_logits.abs().max().item())
    assert err <= 1e-4, err

    digest = hashlib.sha256(model_store.read_bytes()).hexdigest()
    have = _cached_chunks(node_cache, digest)
    n_chunks = -(-model_store.stat().st_size // CHUNK)
    assert 0 < len(have) < n_chunks, (len(have), n_chunks)  # its slice and the header, not the whole file
    # A second executor on that node reuses the cache: nothing more is served.
    from ollama_distributed.runtime.weight_fetch import HOLDER_NAME

    holder = ray.get_actor(HOLDER_NAME)
    served = ray.get(holder.served_bytes.remote())
    ex = RayExecutor(uniform_plan(cfg, [["node0"], [NODE]], "tiny"), model_store, ray_cluster, max_seq_len=64)
    try:
        assert _greedy(ex, [1, 17, 42, 99, 7], 8)[0] == ref_tokens
    finally:
        ex.close()
    assert ray.get(holder.served_bytes.remote()) == served
    progress = ray.get(holder.progress.remote())
    assert any(p["model"] == model_store.name and p["bytes_done"] == p["bytes_total"] > 0 for p in progress), progress


def _on(cluster, name: str) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return dict(scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.node_id(name), soft=False))


def _worker(cluster, name: str):
    """A bare shard worker (the runtime's own actor) on `name`, to load a shard by hand."""
    import ray

    from ollama_distributed.runtime.worker import ShardWorker

    return ray.remote(ShardWorker).options(num_cpus=0, max_restarts=0, **_on(cluster, name)).remote(1)


def _load(worker, path: Path, cfg, holder):
    """Load the last half of the layers and the head (the stage a second node would run)."""
    spec = {"layers": (cfg.n_layers // 2, cfg.n_layers), "kv_heads": (0, cfg.n_kv_heads), "ffn": (0, cfg.ffn_size),
            "has_embedding": False, "has_output": True}
    return worker.load.remote(str(path), spec, "auto", 64, None, holder)


def _fetched_once(cluster, model_store: Path, node_cache: Path) -> tuple[Any, str, set[int]]:
    """Load the second stage once on the node without the file (its slice lands in its cache), end that worker;
    (config, file digest, cached chunks)."""
    import ray

    from ollama_distributed.runtime.weight_fetch import holder_actor

    cfg = read_config(model_store)
    digest = hashlib.sha256(model_store.read_bytes()).hexdigest()
    worker = _worker(cluster, NODE)
    ray.get(_load(worker, model_store, cfg, holder_actor()), timeout=120)
    ray.kill(worker)
    return cfg, digest, _cached_chunks(node_cache, digest)


def _second_stage_on_node2(cluster, cfg, model_store: Path) -> tuple[list[int], dict[str, Any]]:
    """A PP=2 plan with its second stage on the second node without the file: its greedy tokens and what that
    stage's node fetched (placement's weights_fetched)."""
    ex = RayExecutor(uniform_plan(cfg, [["node0"], [NODE2]], "tiny"), model_store, cluster, max_seq_len=64)
    try:
        tokens, _ = _greedy(ex, [1, 17, 42, 99, 7], 8)
        return tokens, ex.placement()["stages"][1]["shards"][0]["weights_fetched"]
    finally:
        ex.close()


def test_expert_parallel_shard_fetches_only_its_experts(ray_cluster, nofile_node, model_store) -> None:
    """A qwen3moe plan with experts split 3 + 5 over node0 and the node without the file: the node fetches only its
    experts' runs of each stacked expert tensor, and the plan's greedy tokens equal the in-process engine's."""
    from tests.helpers.tiny_gguf import write_tiny_qwen3moe_gguf

    path = write_tiny_qwen3moe_gguf(model_store.parent / "moe" / "m.gguf", hidden=64, expert_ffn=512, n_expert=8)
    cfg = read_config(path)
    plan = uniform_plan(cfg, [["node0", NODE]], "moe")
    for shard, experts in zip(plan["stages"][0]["shards"], ([0, 3], [3, 8])):
        shard.update(ffn=[0, cfg.ffn_size], experts=experts)  # experts split, each expert whole
    ref = LocalExecutor(path, max_seq_len=64)
    ref_tokens, _ = _greedy(ref, [1, 17, 42, 99, 7], 8)
    ref.close()
    ex = RayExecutor(plan, path, ray_cluster, max_seq_len=64)
    try:
        tokens, _ = _greedy(ex, [1, 17, 42, 99, 7], 8)
        fetched = [sh.get("weights_fetched") for st in ex.placement()["stages"] for sh in st["shards"]]
    finally:
        ex.close()
    assert tokens == ref_tokens
    # TP rank 1 of the only stage holds the embedding, not the head (rank 0 of the last stage computes the logits)
    mine, all_experts = (slice_bytes(path, (0, cfg.n_layers), True, False, e, CHUNK) for e in ((3, 8), None))
    assert fetched[0] is None and fetched[1]["slice_bytes"] == mine < all_experts, (fetched, all_experts)


def test_interrupted_transfer_resumes(ray_cluster, nofile_node, model_store, node_cache) -> None:
    """A fetch killed mid-way (its process SIGKILLed) leaves only verified chunks recorded; the next fetch asks
    for the rest only, and the slice it completes loads to the same logits."""
    import ray

    digest = hashlib.sha256(model_store.read_bytes()).hexdigest()
    shutil.rmtree(node_cache / digest, ignore_errors=True)
    # A holder of its own, serving at 2 MB/s, so the transfer lasts long enough to be killed part-way.
    here = _on(ray_cluster, "node0")
    holder = ray.remote(WeightHolder).options(max_concurrency=8, **here).remote(CHUNK, 2e6)
    cfg = read_config(model_store)
    worker = _worker(ray_cluster, NODE)
    pid = ray.get(worker.info.remote())["pid"]
    run = _load(worker, model_store, cfg, holder)
    deadline = time.monotonic() + 60
    while len(_cached_chunks(node_cache, digest)) < 8:
        assert time.monotonic() < deadline, "the fetch did not start"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayError):
        ray.get(run, timeout=60)
    kept = _cached_chunks(node_cache, digest)
    served_before = ray.get(holder.served_bytes.remote())

    worker = _worker(ray_cluster, NODE)
    info = ray.get(_load(worker, model_store, cfg, holder), timeout=120)
    assert info["weight_bytes"] > 0 and 0 < info["weights_from"]["fetched_bytes"] < info["weights_from"]["slice_bytes"]
    assert info["weights_from"]["transport"] == "stream", info["weights_from"]
    ray.kill(worker)
    served_again = ray.get(holder.served_bytes.remote()) - served_before
    done = _cached_chunks(node_cache, digest)
    assert kept < done and served_again <= len(done - kept) * CHUNK, (len(kept), len(done), served_again)
    # every chunk on the node's disk is the holder's
    data = model_store.read_bytes()
    with open(node_cache / digest / "model.gguf", "rb") as f:
        local = f.read()
    for i in done:
        assert local[i * CHUNK:(i + 1) * CHUNK] == data[i * CHUNK:(i + 1) * CHUNK], i


def test_a_flipped_byte_at_the_holder_is_refused(ray_cluster, nofile_node, model_store, node_cache) -> None:
    """A byte flipped in the holder's file after its chunk table was made (mtime kept, so the table stands) is
    caught by the fetching node's check and the load fails naming the chunk; flipped with a new mtime, the holder
    re-hashes and refuses the blob as not matching its name."""
    import ray

    blob = model_store.parent / "flipped" / model_store.name  # hidden from the node too; its own holder and table
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(model_store.read_bytes())
    here = _on(ray_cluster, "node0")
    holder = ray.remote(WeightHolder).options(max_concurrency=8, **here).remote(CHUNK, 0)
    table = ray.get(holder.table.remote(str(blob)))
    shutil.rmtree(node_cache / table.digest, ignore_errors=True)
    cfg = read_config(blob)
    offset = table.size - 1000  # in the output head, which the last stage reads
    st = blob.stat()
    with open(blob, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    worker = _worker(ray_cluster, NODE)
    with pytest.raises(ray.exceptions.RayError, match="does not match its xxh3_128 hash"):
        ray.get(_load(worker, blob, cfg, holder), timeout=120)
    assert offset // CHUNK not in _cached_chunks(node_cache, table.digest)

    os.utime(blob)  # a changed file: the holder hashes it again and finds it is not the blob its name says
    shutil.rmtree(node_cache / table.digest, ignore_errors=True)
    with pytest.raises(ray.exceptions.RayError, match="corrupt"):
        ray.get(_load(worker, blob, cfg, holder), timeout=120)
    ray.kill(worker)


def test_a_cached_chunk_that_changed_on_disk_is_fetched_again(ray_cluster, nofile_node, model_store,
                                                              node_cache) -> None:
    """A node loading from its own cache checks the cached chunks against the holder's table again: one byte
    flipped in a recorded chunk on the node's disk makes that chunk, and only it, be fetched again; the load
    equals the in-process engine's and the cache holds the holder's bytes again."""
    import ray

    from ollama_distributed.runtime.weight_fetch import HOLDER_NAME, holder_actor

    cfg, digest, cached = _fetched_once(ray_cluster, model_store, node_cache)
    cached = sorted(cached)
    victim = cached[len(cached) // 2]
    with open(node_cache / digest / "model.gguf", "r+b") as f:  # the test shares the node's disk
        f.seek(victim * CHUNK + 7)
        b = f.read(1)
        f.seek(victim * CHUNK + 7)
        f.write(bytes([b[0] ^ 0x01]))
    holder = ray.get_actor(HOLDER_NAME)
    served = ray.get(holder.served_bytes.remote())
    worker = _worker(ray_cluster, NODE)
    info = ray.get(_load(worker, model_store, cfg, holder_actor()), timeout=120)
    ray.kill(worker)
    got = info["weights_from"]
    assert got["fetched_bytes"] == CHUNK == ray.get(holder.served_bytes.remote()) - served, got
    assert got["verify_s"] > 0, got
    data = model_store.read_bytes()
    with open(node_cache / digest / "model.gguf", "rb") as f:
        f.seek(victim * CHUNK)
        assert f.read(CHUNK) == data[victim * CHUNK:(victim + 1) * CHUNK]
    assert victim in _cached_chunks(node_cache, digest)


def _until_closed(sock) -> bytes:
    got = b""
    with contextlib.suppress(ConnectionResetError):  # closed with what we sent unread: a reset
        while chunk := sock.recv(1 << 16):
            got += chunk
    return got


def test_the_weight_stream_serves_only_who_knows_the_secret(ray_cluster, model_store) -> None:
    """The holder's stream (a real holder actor on node0, a real socket on 127.0.0.1): a client that answers the
    challenge with the secret handed out over Ray reads the file's bytes; one with another secret, or one that
    does not answer, gets nothing and the connection closed; a file not registered by its table is not served."""
    import socket

    import ray

    from ollama_distributed.runtime.weight_stream import MAGIC, ChunkStream, Endpoint, StreamRefused

    holder = ray.remote(WeightHolder).options(max_concurrency=8, **_on(ray_cluster, "node0")).remote(CHUNK, 0)
    table = ray.get(holder.table.remote(str(model_store)))
    ep = ray.get(holder.endpoint.remote())
    assert ep.host == "127.0.0.1" and not ep.tls
    data = model_store.read_bytes()
    stream = ChunkStream(ep)
    buf = bytearray(2 * CHUNK)
    stream.request(table.digest, CHUNK, CHUNK)
    stream.request(table.digest, 3 * CHUNK, CHUNK)
    stream.receive_into(memoryview(buf)[:CHUNK])
    stream.receive_into(memoryview(buf)[CHUNK:])
    assert bytes(buf) == data[CHUNK:2 * CHUNK] + data[3 * CHUNK:4 * CHUNK]
    stream.request("0" * 64, 0, 16)  # not a file this holder was asked for
    with pytest.raises(ConnectionError, match="did not serve"):
        stream.receive_into(memoryview(bytearray(16)))
    stream.close()

    with pytest.raises(StreamRefused, match="refused"):
        ChunkStream(Endpoint(ep.host, ep.port, b"\0" * 32, False))
    with socket.create_connection((ep.host, ep.port), timeout=30) as raw:  # no answer: a request straight away
        hello = raw.recv(4)
        assert hello == MAGIC
        raw.sendall(table.digest.encode() + (0).to_bytes(8, "big") + CHUNK.to_bytes(8, "big"))
        got = _until_closed(raw)
        assert len(got) <= 32  # the rest of the nonce, then closed: not a byte of the file
        assert data[:16] not in got
    assert ray.get(holder.served_bytes.remote()) == 2 * CHUNK
    ray.kill(holder)


def test_the_weight_stream_speaks_tls_with_rays_certificates(tmp_path, model_store) -> None:
    """With RAY_USE_TLS's files (a CA-signed certificate on both sides, as Ray's gRPC), the stream is TLS: a
    client with the certificate reads the bytes; one speaking plaintext, or TLS without a certificate, does not."""
    import socket
    import ssl

    from ollama_distributed.runtime.weight_stream import ChunkServer, ChunkStream, TLSFiles

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / "key.pem",
                    "-out", tmp_path / "cert.pem", "-days", "1", "-subj", "/CN=ray", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    tls = TLSFiles(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), str(tmp_path / "cert.pem"))
    digest = "ab" * 32
    server = ChunkServer({digest: str(model_store)}.get, lambda n: None, lambda n: None, "127.0.0.1", tls)
    try:
        ep = server.endpoint
        assert ep.tls
        stream = ChunkStream(ep, tls)
        buf = bytearray(CHUNK)
        stream.request(digest, 0, CHUNK)
        stream.receive_into(memoryview(buf))
        stream.close()
        assert bytes(buf) == model_store.read_bytes()[:CHUNK]
        with socket.create_connection((ep.host, ep.port), timeout=30) as raw:  # plaintext: no nonce, closed
            raw.sendall(b"\0" * 64)
            assert b"ODW1" not in _until_closed(raw)
        bare = ssl.create_default_context(cafile=tls.ca)
        bare.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with bare.wrap_socket(socket.create_connection((ep.host, ep.port), timeout=30)) as s:
                s.recv(1)  # TLS 1.3 reports the missing client certificate on the first read
                s.sendall(b"\0" * 32)
                assert s.recv(1)
    finally:
        server.close()


def test_an_unreachable_stream_falls_back_to_ray(ray_cluster, nofile_node, model_store, node_cache) -> None:
    """Where the holder's stream cannot be reached, the chunks travel as Ray objects (the holder's `read`) and the
    load is the same."""
    import socket

    import ray

    from ollama_distributed.runtime.weight_stream import Endpoint

    class NoStream(WeightHolder):  # its stream endpoint is a port nothing listens on (a firewalled one, say)
        def endpoint(self) -> Endpoint:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            return Endpoint("127.0.0.1", port, b"\0" * 32, False)

    digest = hashlib.sha256(model_store.read_bytes()).hexdigest()
    shutil.rmtree(node_cache / digest, ignore_errors=True)
    holder = ray.remote(NoStream).options(max_concurrency=8, **_on(ray_cluster, "node0")).remote(CHUNK, 0)
    cfg = read_config(model_store)
    worker = _worker(ray_cluster, NODE)
    info = ray.get(_load(worker, model_store, cfg, holder), timeout=120)
    ray.kill(worker)
    got = info["weights_from"]
    assert got["transport"] == "ray" and got["fetched_bytes"] == got["slice_bytes"] > 0, got
    assert ray.get(holder.served_bytes.remote()) == got["fetched_bytes"]
    ray.kill(holder)


# ---- the planner knows what each node holds (scheduler/load_cost.py) ---------------------------------------------
def _equal_measurement(cluster, faster: str):
    """Every alive node measured alike (and `faster` 2 % faster, so a plan blind to the weights picks it): the
    real nodes and their ids, with hardware numbers that make the planner's choice a near-tie on purpose."""
    from ollama_distributed.runtime.measure import ClusterMeasurement, LinkMeasurement, NodeMeasurement

    nodes = [n for n in cluster.nodes()]
    meas = tuple(NodeMeasurement(n.name, n.node_id, n.address, 8 << 30, 8 << 30, 2 << 30,
                                 10e9 * (1.02 if n.name == faster else 1.0), 1e11, 1, "cpu") for n in nodes)
    links = tuple(LinkMeasurement(a.name, b.name, 1e-4, 1e9) for i, a in enumerate(nodes) for b in nodes[i + 1:])
    return ClusterMeasurement(meas, links)


def test_plans_know_what_each_real_node_holds_and_recovery_prefers_holders(ray_cluster, nofile_node, model_store,
                                                                           node_cache) -> None:
    """Holdings asked of the real nodes: node0-3 see the file, the node without it holds the last stage's slice in
    its cache. A re-plan after losing nodes 1-3 (the survivors measured alike, the node without the file 2 %
    faster) lands on node0, which holds the file, where a plan blind to the weights picks the other; with node0
    lost too, the plan on the remaining node says it fetches exactly the chunks its cache lacks, and the load then
    fetches exactly that many bytes."""
    import ray

    from ollama_distributed.runtime.measure import to_cluster_spec
    from ollama_distributed.runtime.recovery import Recovery, planning_inputs
    from ollama_distributed.runtime.weight_fetch import file_layout, holder_actor, weight_sources
    from ollama_distributed.scheduler import PlanConfig, plan
    from ollama_distributed.scheduler.load_cost import shard_chunks

    cfg = read_config(model_store)
    digest = hashlib.sha256(model_store.read_bytes()).hexdigest()
    shutil.rmtree(node_cache / digest, ignore_errors=True)
    worker = _worker(ray_cluster, NODE)  # the node fetches the last stage's slice (a PP=2 plan's second stage)
    ray.get(_load(worker, model_store, cfg, holder_actor()), timeout=120)
    ray.kill(worker)
    cached = _cached_chunks(node_cache, digest)
    assert cached

    meas = _equal_measurement(ray_cluster, faster=NODE)
    sources = weight_sources(model_store, ray_cluster, to_cluster_spec(meas))
    assert sources.holder == "node0"
    assert {n: h.has_file for n, h in sources.holdings.items()} == {
        "node0": True, "node1": True, "node2": True, "node3": True, NODE: False}
    assert sources.holdings[NODE].chunks == cached

    rec = Recovery(model_store, ray_cluster, strategy="single", measurement=meas)
    keep = {"node0", NODE}
    blind = plan(*planning_inputs(model_store, meas, keep, torch.float32), PlanConfig(strategy="single"))
    assert blind.nodes == [NODE]  # the premise: without the holdings the faster node wins
    chosen = rec.plan(exclude={"node1", "node2", "node3"})
    assert chosen.nodes == ["node0"] and [(l.node, l.holds, l.fetch_bytes) for l in chosen.load] == [
        ("node0", "file", 0)], chosen.reason
    assert "Prefers nodes holding the weights" in chosen.reason

    layout = file_layout(model_store, CHUNK)
    need = shard_chunks(layout, (0, cfg.n_layers), True, True)
    lacking = sum(layout.chunk_len(i) for i in need if i not in cached)
    only = rec.plan(exclude={"node0", "node1", "node2", "node3"})
    assert [(l.node, l.holds, l.fetch_bytes) for l in only.load] == [(NODE, "slice", lacking)], only.reason
    assert f"{NODE} fetches" in only.reason and "part cached" in only.reason
    ex = rec.place(exclude={"node0", "node1", "node2", "node3"})
    try:
        placed = ex.placement()
        fetched = placed["stages"][0]["shards"][0]["weights_fetched"]
    finally:
        ex.close()
    assert fetched["fetched_bytes"] == lacking, (fetched, lacking)
    assert placed["load"][0]["fetch_bytes"] == lacking  # the status endpoint's plan entry says it too


def test_pull_stages_the_slices_with_progress_an_ollama_client_reads(ray_cluster, nofile_node, model_store,
                                                                    node_cache) -> None:
    """A real server on this cluster (`serve --address`), its store hidden from the node without the file, every
    other node drained: `ollama.Client.pull` of the model streams the node's fetch as pull progress (status
    "pulling slice node nofile", the blob's digest, total = the bytes the plan announced), ends with "success", and
    leaves the slice in the node's cache, so the first generate on it fetches nothing and answers as the in-process
    engine does."""
    import httpx
    import ollama

    from ollama_distributed.runtime.weight_fetch import file_layout
    from ollama_distributed.scheduler.load_cost import shard_chunks
    from tests.api.conftest import create_model, greedy_texts, start_server, stop_server

    digest = hashlib.sha256(model_store.read_bytes()).hexdigest()
    shutil.rmtree(node_cache / digest, ignore_errors=True)
    srv = start_server(model_store.parent / "srv", ["--address", ray_cluster.address, "--strategy", "single"])
    try:
        create_model(srv.url, "tiny", model_store)
        for n in ("node0", "node1", "node2", "node3"):
            r = httpx.post(f"{srv.url}/api/distributed/nodes/{n}/drain", timeout=120)
            assert r.status_code == 200, r.text
        lines = list(ollama.Client(host=srv.url).pull("tiny", stream=True))
        staged = [l for l in lines if l.status == f"pulling slice node {NODE}"]
        assert lines[-1].status == "success", lines
        assert staged and all(l.digest == f"sha256:{digest}" for l in staged), lines
        layout = file_layout(model_store, CHUNK)
        need = shard_chunks(layout, (0, read_config(model_store).n_layers), True, True)  # the single plan's shard
        done = [l.completed for l in staged]
        assert done == sorted(done) and done[-1] == staged[-1].total == sum(layout.chunk_len(i) for i in need), staged
        assert _cached_chunks(node_cache, digest) == set(need)
        prompt = "The sky is"
        r = httpx.post(f"{srv.url}/api/generate", json={"model": "tiny", "prompt": prompt, "raw": True, "stream": False,
                                                        "options": {"temperature": 0, "num_predict": 8}}, timeout=300)
        assert r.status_code == 200, r.text
        status = httpx.get(f"{srv.url}/api/distributed/status", timeout=60).json()
        plan = next(p for m in status["models"] for p in m["plans"])
        shard = plan["stages"][0]["shards"][0]
        assert shard["node"] == NODE and shard["weights_fetched"]["fetched_bytes"] == 0, shard
        assert [(l["node"], l["holds"], l["fetch_bytes"]) for l in plan["load"]] == [(NODE, "slice", 0)], plan
        assert r.json()["response"] == greedy_texts(model_store, [prompt], 8)[prompt]
    finally:
        stop_server(srv)


@pytest.fixture(scope="module")
def second_nofile_node(ray_cluster, nofile_node, model_store, tmp_path_factory):
    """A second node without the file, with a slice cache of its own."""
    with _joined_without_the_file(ray_cluster, NODE2, model_store, tmp_path_factory.mktemp("nofile2-cache"),
                                  tmp_path_factory) as name:
        yield name


def test_a_node_that_fetched_a_slice_serves_it_to_the_next(ray_cluster, nofile_node, second_nofile_node,
                                                           model_store, node_cache) -> None:
    """The node without the file holds the last stage's slice in its cache; a PP=2 plan puts that stage on a second
    such node: its load takes chunks from the first node's cache (a SlicePeer) as well as from the holder, every
    chunk checked against the holder's table, so the server's node sends only part of the slice; the tokens equal
    the in-process engine's."""
    import ray

    from ollama_distributed.runtime.weight_fetch import HOLDER_NAME, peer_actor

    cfg, _, _ = _fetched_once(ray_cluster, model_store, node_cache)  # the first node holds the slice
    ref = LocalExecutor(model_store, max_seq_len=64)
    ref_tokens, _ = _greedy(ref, [1, 17, 42, 99, 7], 8)
    ref.close()
    holder = ray.get_actor(HOLDER_NAME)
    served = ray.get(holder.served_bytes.remote())
    tokens, fetched = _second_stage_on_node2(ray_cluster, cfg, model_store)
    assert tokens == ref_tokens
    from_holder = ray.get(holder.served_bytes.remote()) - served
    from_peer = ray.get(peer_actor(ray_cluster.node_id(NODE)).served_bytes.remote())
    assert fetched["fetched_bytes"] == fetched["slice_bytes"] == from_holder + from_peer, (fetched, from_holder,
                                                                                          from_peer)
    assert 0 < from_peer and 0 < from_holder < fetched["fetched_bytes"], (from_holder, from_peer)


def test_a_peer_sending_a_bad_chunk_is_caught_and_the_holder_asked(ray_cluster, nofile_node, second_nofile_node,
                                                                    model_store, node_cache) -> None:
    """Every chunk of the first node's cache flipped on its disk (its record still says verified): each chunk the
    second node asks of that peer fails the holder's sha256, is asked of the holder instead, and the load still
    equals the in-process engine's, its cache byte for byte the holder's file."""
    import ray

    from ollama_distributed.runtime.weight_fetch import HOLDER_NAME, peer_actor

    cfg, digest, cached = _fetched_once(ray_cluster, model_store, node_cache)
    with open(node_cache / digest / "model.gguf", "r+b") as f:  # the test shares the node's disk
        for i in cached:
            f.seek(i * CHUNK)
            b = f.read(1)
            f.seek(i * CHUNK)
            f.write(bytes([b[0] ^ 0xFF]))
    ref = LocalExecutor(model_store, max_seq_len=64)
    ref_tokens, _ = _greedy(ref, [1, 17, 42, 99, 7], 8)
    ref.close()
    ray.get(_clear_cache_on(ray_cluster, NODE2, digest))  # the second node starts cold again
    holder = ray.get_actor(HOLDER_NAME)
    peer = peer_actor(ray_cluster.node_id(NODE))
    served, peer_served = ray.get(holder.served_bytes.remote()), ray.get(peer.served_bytes.remote())
    tokens, fetched = _second_stage_on_node2(ray_cluster, cfg, model_store)
    assert tokens == ref_tokens
    from_holder = ray.get(holder.served_bytes.remote()) - served
    from_peer = ray.get(peer.served_bytes.remote()) - peer_served
    assert from_peer > 0 and from_holder == fetched["fetched_bytes"], (from_holder, from_peer, fetched)
    shutil.rmtree(node_cache / digest)  # the flipped cache is not left for other tests


def test_a_peer_that_cannot_serve_leaves_its_chunks_to_the_holder(ray_cluster, nofile_node, second_nofile_node,
                                                                  model_store, node_cache) -> None:
    """A peer said to hold chunks whose cache is gone by the time it is asked (its stream answers "unknown file",
    its Ray read fails): the second node's load asks the holder for those chunks instead and completes, every
    byte of its slice from the holder."""
    import ray

    from ollama_distributed.runtime.weight_fetch import HOLDER_NAME, Peered, holder_actor, peer_actor

    cfg, digest, cached = _fetched_once(ray_cluster, model_store, node_cache)
    cached = frozenset(cached)
    shutil.rmtree(node_cache / digest)  # gone after the planner was told
    ray.get(_clear_cache_on(ray_cluster, NODE2, digest))
    holder = ray.get_actor(HOLDER_NAME)
    served = ray.get(holder.served_bytes.remote())
    worker = _worker(ray_cluster, NODE2)
    info = ray.get(_load(worker, model_store, cfg, Peered(holder_actor(), ((peer_actor(ray_cluster.node_id(NODE)),
                                                                             cached),))), timeout=120)
    ray.kill(worker)
    got = info["weights_from"]
    assert got["fetched_bytes"] == got["slice_bytes"] == ray.get(holder.served_bytes.remote()) - served, got


def _clear_cache_on(cluster, name: str, digest: str):
    """Remove the slice cache of `digest` on node `name` (its own cache directory, seen from its namespace)."""
    import ray

    def clear() -> None:
        from ollama_distributed.runtime.weight_fetch import cache_root

        shutil.rmtree(cache_root() / digest, ignore_errors=True)

    return ray.remote(num_cpus=0)(clear).options(**_on(cluster, name)).remote()


# ---- who can read a chunk on the wire (README "Several machines"; weight_fetch.py "Transport") ----------------------
_SECURED_RAY = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False)
n = ray.nodes()[0]
print("NODE", n["NodeManagerAddress"], n["ObjectManagerPort"], flush=True)
sys.stdin.read()  # until the test closes it
"""


def _pull(address: str, token: str | None, tls: Path | None) -> str:
    """A bare call of the object manager's Pull (the RPC by which a node's object store asks another for an object:
    how every fetched chunk crosses the network), as someone on the network would make it: the status name."""
    import grpc

    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        pem, key = (tls / "cert.pem").read_bytes(), (tls / "key.pem").read_bytes()
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(pem, key, pem))
    call = channel.unary_unary("/ray.rpc.ObjectManagerService/Pull", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    try:
        call(b"", metadata=[("authorization", f"Bearer {token}")] if token else [], timeout=10)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


@pytest.mark.parametrize("tls", [False, True], ids=["token", "token+tls"])
def test_object_store_transfers_need_the_cluster_token(tmp_path, tls) -> None:
    """What Ray 2.60 covers on the path the weights take: with RAY_AUTH_MODE=token the object manager refuses a
    Pull without the cluster's token (so no one without it can ask a node for a chunk), and with RAY_USE_TLS=1 it
    speaks only TLS (so no one on the network reads the bytes). A Ray instance of its own, in a subprocess."""
    import secrets
    import select

    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    certs = None
    if tls:
        if shutil.which("openssl") is None:
            pytest.skip("needs the openssl command to make a certificate")
        import ray

        certs = tmp_path
        # Ray's own processes verify each other against it: it names the address Ray picks for the node too
        here = ray.util.get_node_ip_address()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", certs / "key.pem",
                        "-out", certs / "cert.pem", "-days", "1", "-subj", "/CN=ray", "-addext",
                        f"subjectAltName=IP:127.0.0.1,IP:{here},DNS:localhost"], check=True, capture_output=True)
        env.update(RAY_USE_TLS="1", RAY_TLS_SERVER_CERT=str(certs / "cert.pem"),
                   RAY_TLS_SERVER_KEY=str(certs / "key.pem"), RAY_TLS_CA_CERT=str(certs / "cert.pem"))
    proc = subprocess.Popen([sys.executable, "-c", _SECURED_RAY], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline().decode() if ready else ""
        assert line.startswith("NODE "), f"the secured Ray instance did not start: {line!r}"
        _, _, port = line.split()
        address = f"127.0.0.1:{port}"
        if not tls:
            assert _pull(address, None, None) == "UNAUTHENTICATED"
            assert _pull(address, "0" * 32, None) == "UNAUTHENTICATED"
            assert _pull(address, token, None) == "OK"
        else:
            assert _pull(address, token, None) == "UNAVAILABLE"  # plaintext: the server closes the socket
            assert _pull(address, "0" * 32, certs) == "UNAUTHENTICATED"
            assert _pull(address, token, certs) == "OK"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
