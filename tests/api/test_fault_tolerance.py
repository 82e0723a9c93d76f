"""Issue 6: a streamed request survives the loss of a shard worker or a whole node (real processes SIGKILLed).

Each scenario starts one real `serve --local-nodes N` server (separate raylets on 127.0.0.1), streams greedy
generations of the tiny model, kills a process the server's `/api/distributed/status` names, and checks that the
stream completes with exactly the text of a run without the failure (an in-process LocalExecutor engine), with no
gap and no duplicate. Kill-to-next-token times are printed (`-s`) and asserted under a generous bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import end_process_group, greedy_gaps, greedy_texts, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

N_PREDICT = 200
# Prompts whose greedy path on the tiny model has no near-tie (the `references` fixture checks it): a recovered
# stream is compared token for token with an uninterrupted run, but the replay computes the same logits with other
# batch shapes, whose float32 rounding differs by ~5e-6 of the largest logit (measured); e.g. "Once upon a time"
# has a top-2 gap of 1.1e-5 at its 57th token and flipped there when a kill landed just before it.
PROMPTS = ["The quick brown fox", "Once upon a midnight", "In a distant galaxy", "A long time ago",
           "Roses are red", "To be or not to be", "Hello! How are", "The weather today"]
NEAR_TIE = 5e-5  # smallest top-2 logit gap, relative to the top logit, that float noise cannot flip (10x margin)
KILL_TO_TOKEN_LIMIT_S = 60.0  # generous for 2 loaded cores; the measured value is printed (target < 5 s)


@pytest.fixture(scope="module")
def references(tiny_gguf: Path) -> dict[str, str]:
    """Greedy texts of a run without failures (in-process engine), per prompt; each prompt's path is first
    checked to be clear of near-ties (see PROMPTS)."""
    for prompt, (gap, at) in greedy_gaps(tiny_gguf, PROMPTS, N_PREDICT).items():
        assert gap >= NEAR_TIE, (f"{prompt!r}: top-2 logit gap {gap:.1e} (relative) at generated token {at}, "
                                 "within float noise of a flip: pick another prompt")
    return greedy_texts(tiny_gguf, PROMPTS, N_PREDICT)


def _server(tmp_path_factory, tiny_gguf: Path, args: list[str]):
    srv = start_server(tmp_path_factory.mktemp("ft-server"), args, extra_env={"OLLAMA_NUM_PARALLEL": "8"},
                       timeout=300)
    r = httpx.post(srv.url + "/api/create", json={"model": "tiny", "from": str(tiny_gguf), "stream": False},
                   timeout=120)
    assert r.status_code == 200, r.text
    return srv


def _shards(srv) -> list[dict]:
    status = httpx.get(srv.url + "/api/distributed/status", timeout=120).json()
    model = next(m for m in status["models"] if m["name"] == "tiny:latest")
    return [dict(s, stage=i) for i, st in enumerate(model["plans"][0]["stages"]) for s in st["shards"]]


def _nodes(srv) -> dict[str, dict]:
    return {n["id"]: n for n in httpx.get(srv.url + "/api/distributed/status", timeout=120).json()["nodes"]}


class Stream:
    """One streamed /api/generate in a thread: its text, final line, and when each chunk arrived."""

    def __init__(self, url: str, prompt: str) -> None:
        self.url, self.prompt = url, prompt
        self.parts: list[str] = []
        self.times: list[float] = []
        self.final: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"model": "tiny", "prompt": self.prompt, "raw": True, "stream": True,
                "options": {"temperature": 0, "num_predict": N_PREDICT}}
        try:
            with httpx.stream("POST", self.url + "/api/generate", json=body, timeout=240) as r:
                for line in r.iter_lines():
                    if not line:
                        continue
                    msg = json.loads(line)
                    if msg.get("done") or "error" in msg:
                        self.final = msg
                        break
                    self.parts.append(msg["response"])
                    self.times.append(time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_tokens(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.parts) < n and self.thread.is_alive():
            assert time.monotonic() < deadline, f"stream made no progress: {len(self.parts)} chunks"
            time.sleep(0.01)

    def join(self, timeout: float = 240) -> str:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not finish"
        assert self.error is None, self.error
        return "".join(self.parts)

    def stall_after(self, t: float) -> float:
        """The longest wait for a chunk after time t (chunks already in transit at t arrive at once; the
        recovery shows as the longest gap)."""
        after = [t] + [x for x in self.times if x > t]
        return max(b - a for a, b in zip(after, after[1:])) if len(after) > 1 else 0.0


def _recoveries(srv) -> int:
    r = httpx.get(srv.url + "/api/distributed/events", params={"kind": "recovery", "limit": 1000}, timeout=30)
    return len(r.json()["events"])


def _kill_and_check(srv, streams: list[Stream], references: dict[str, str], victim: dict) -> float:
    for s in streams:
        s.wait_tokens(40)
    before = _recoveries(srv)
    assert all(s.final is None for s in streams), "a stream ended before the kill"
    t_kill = time.perf_counter()
    os.kill(victim["pid"], signal.SIGKILL)
    texts = [s.join() for s in streams]
    assert _recoveries(srv) == before + 1, srv.log()[-3000:]
    recovery = httpx.get(srv.url + "/api/distributed/status", timeout=120).json()["recovery"]
    last = recovery["models"]["tiny:latest"]["recoveries"][-1]
    assert last["error"] is None and last["seconds"] > 0, recovery
    for s, text in zip(streams, texts):
        assert s.final is not None and "error" not in s.final, (s.final, srv.log()[-3000:])
        assert s.final["done_reason"] == "length" or len(text) < len(references[s.prompt]) + 1
        assert text == references[s.prompt], f"{s.prompt!r}: text differs after recovery\n{srv.log()[-3000:]}"
    gap = max(s.stall_after(t_kill) for s in streams)
    assert gap < KILL_TO_TOKEN_LIMIT_S
    new_pids = {sh["pid"] for sh in _shards(srv)}
    assert victim["pid"] not in new_pids
    return gap


# ---- pipeline: kill a stage's worker, with one and with eight requests in flight ----------------------------


@pytest.fixture(scope="module")
def pipeline_server(tmp_path_factory, tiny_gguf: Path):
    # 34 MiB per node cannot hold the tiny model's ~40 MB of f32 weights: the planner splits it in two stages.
    srv = _server(tmp_path_factory, tiny_gguf, ["--local-nodes", "2", "--strategy", "pipeline",
                                                "--node-memory", "34MiB"])
    try:
        yield srv
    finally:
        stop_server(srv)


def test_kill_pipeline_stage_worker_stream_completes(pipeline_server, references) -> None:
    srv = pipeline_server
    s = Stream(srv.url, PROMPTS[0])
    s.wait_tokens(1)
    shards = _shards(srv)
    assert len({sh["stage"] for sh in shards}) == 2
    gap = _kill_and_check(srv, [s], references, shards[-1])  # the last stage's worker
    print(f"\npipeline stage kill → next token: {gap:.2f} s")


def test_kill_while_eight_requests_in_flight(pipeline_server, references) -> None:
    srv = pipeline_server
    streams = [Stream(srv.url, p) for p in PROMPTS]
    streams[0].wait_tokens(1)
    victim = _shards(srv)[0]  # the first stage this time (the other node)
    gap = _kill_and_check(srv, streams, references, victim)
    print(f"\n8 in flight, stage-0 kill → next token on every stream within {gap:.2f} s")


# ---- tensor parallel ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensor_server(tmp_path_factory, tiny_gguf: Path):
    srv = _server(tmp_path_factory, tiny_gguf, ["--local-nodes", "2", "--strategy", "tensor"])
    try:
        yield srv
    finally:
        stop_server(srv)


def test_kill_tensor_parallel_shard_worker(tensor_server, references) -> None:
    srv = tensor_server
    s = Stream(srv.url, PROMPTS[1])
    s.wait_tokens(1)
    shards = _shards(srv)
    assert len(shards) == 2 and len({sh["stage"] for sh in shards}) == 1, shards
    gap = _kill_and_check(srv, [s], references, shards[1])
    print(f"\ntensor-parallel shard kill → next token: {gap:.2f} s")


# ---- a whole node removed; then too little capacity; then capacity returns ----------------------------------


def _raylet_of(node_id: str) -> psutil.Process:
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "raylet" in (p.info["name"] or "") and node_id in cmd:
            return p
    raise AssertionError(f"no raylet process for node {node_id}")


@pytest.fixture(scope="module")
def node_server(tmp_path_factory, tiny_gguf: Path):
    srv = _server(tmp_path_factory, tiny_gguf, ["--local-nodes", "3", "--strategy", "pipeline",
                                                "--node-memory", "34MiB"])
    try:
        yield srv
    finally:
        stop_server(srv)


def _kill_node(node_id: str, pids: list[int]) -> None:
    """A machine failing: its raylet and every shard process on it die at once."""
    raylet = _raylet_of(node_id)
    for pid in [raylet.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_remove_node_stream_completes(node_server, references) -> None:
    srv = node_server
    s = Stream(srv.url, PROMPTS[2])
    s.wait_tokens(1)
    nodes = _nodes(srv)
    shards = _shards(srv)
    victims = [sh for sh in shards if not nodes[sh["node_id"]]["resources"].get("node:__internal_head__")]
    assert victims, shards
    node_id = victims[0]["node_id"]
    s.wait_tokens(40)
    before = _recoveries(srv)
    t_kill = time.perf_counter()
    _kill_node(node_id, [sh["pid"] for sh in shards if sh["node_id"] == node_id])
    text = s.join()
    assert _recoveries(srv) == before + 1, srv.log()[-3000:]
    assert s.final is not None and "error" not in s.final, (s.final, srv.log()[-3000:])
    assert text == references[s.prompt]
    print(f"\nnode removal → next token: {s.stall_after(t_kill):.2f} s")
    assert s.stall_after(t_kill) < KILL_TO_TOKEN_LIMIT_S
    assert _nodes(srv)[node_id]["state"] == "dead"
    assert node_id not in {sh["node_id"] for sh in _shards(srv)}


def test_capacity_shortfall_clean_error_then_serving(node_server, references) -> None:
    """Two of three 34 MiB nodes gone: the model (~40 MB) no longer fits. The stream ends with an error line
    naming the shortfall, the server keeps answering, and later requests fail fast with the same reason."""
    srv = node_server
    s = Stream(srv.url, PROMPTS[3])
    s.wait_tokens(1)
    nodes = _nodes(srv)
    shards = _shards(srv)
    victims = [sh for sh in shards if nodes[sh["node_id"]]["state"] == "alive"
               and not nodes[sh["node_id"]]["resources"].get("node:__internal_head__")]
    if not victims:
        pytest.skip("the recovered plan runs on the head node only; nothing left to remove")
    s.wait_tokens(20)
    _kill_node(victims[0]["node_id"], [sh["pid"] for sh in shards if sh["node_id"] == victims[0]["node_id"]])
    s.join()
    assert s.final is not None and "error" in s.final, s.final
    assert "cannot hold" in s.final["error"], s.final
    # still serving: the API answers, and a new request gets a clean error, not a hang
    assert httpx.get(srv.url + "/api/tags", timeout=30).status_code == 200
    t0 = time.perf_counter()
    r = httpx.post(srv.url + "/api/generate", json={"model": "tiny", "prompt": "x", "stream": False,
                                                    "options": {"num_predict": 4}}, timeout=120)
    assert r.status_code == 503 and "hold" in r.text, r.text
    assert time.perf_counter() - t0 < 60


_RAY_START_LOOPBACK = (
    "import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda a: a; "
    "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()"
)


def join_node(srv, name: str, log_dir: Path, memory_mib: int | None = None) -> subprocess.Popen:
    """A new raylet joins the server's Ray cluster (`ray start --address ... --block`, as an operator adds a
    machine), in its own process group (end it with conftest.end_process_group)."""
    head = next(n for n in httpx.get(srv.url + "/api/distributed/status", timeout=60).json()["nodes"]
                if n["state"] == "alive")
    cmd = " ".join(_raylet_of(head["id"]).cmdline())
    gcs = cmd.split("--gcs-address=")[1].split()[0]
    temp = cmd.split("--temp-dir=")[1].split()[0]
    # `ray start --address` refuses to join unless multi-node clusters are enabled, and enabling them makes Ray
    # resolve 127.0.0.1 to the machine's outward address (the server's embedded cluster turns the flag off to
    # stay on loopback, runtime/cluster.py). So run the CLI with the flag on and that resolution switched off.
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_TMPDIR=str(Path(temp).parent),
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_AUTH_MODE", None)
    log = open(log_dir / "ray-start.log", "wb")
    resources = [f'--resources={{"od_memory_mib": {memory_mib}}}'] if memory_mib else []
    return subprocess.Popen([sys.executable, "-c", _RAY_START_LOOPBACK, "start", f"--address={gcs}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=1", *resources,
                             f"--labels=ollama-distributed.io/node={name}", "--block", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_capacity_returns_when_a_node_joins(node_server, references, tmp_path) -> None:
    """After the shortfall, a new node joins the server's Ray cluster (`ray start --address ... --block`, as an
    operator adds a machine): the next request re-places the model and is answered correctly."""
    srv = node_server
    status = httpx.get(srv.url + "/api/distributed/status", timeout=120).json()
    model = next((m for m in status["models"] if m["name"] == "tiny:latest"), None)
    if model is not None and model["plans"][0].get("strategy") != "unplaced":
        pytest.skip("runs after test_capacity_shortfall_clean_error_then_serving left the model unplaced")
    alive = [n for n in status["nodes"] if n["state"] == "alive"]
    assert len(alive) == 1, alive
    proc = join_node(srv, "node9", tmp_path, memory_mib=34)
    try:
        deadline = time.monotonic() + 90
        while not any(n.get("name") == "node9" and n["state"] == "alive" for n in _nodes(srv).values()):
            assert proc.poll() is None, (tmp_path / "ray-start.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "node9 did not join"
            time.sleep(0.5)
        s = Stream(srv.url, PROMPTS[4])
        text = s.join()
        assert s.final is not None and "error" not in s.final, (s.final, srv.log()[-3000:])
        assert text == references[PROMPTS[4]]
        shards = _shards(srv)
        assert any(_nodes(srv)[sh["node_id"]].get("name") == "node9" for sh in shards), shards
    finally:
        end_process_group(proc)


# ---- admission control: a burst beyond the queue bound gets 503s, then service is normal again -------------


def test_burst_gets_503_then_normal_service(server, references) -> None:
    """The session server runs 4 sequences at a time with a queue of 16 (tests/api/conftest.py): 40 requests at
    once overflow it. The overflow is answered at once with 503 "server busy" (Ollama's behaviour), every admitted
    request completes correctly, and when the burst is over a request is served normally."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": "tiny", "prompt": PROMPTS[5], "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": N_PREDICT}}

    def one(_: int) -> httpx.Response:
        return httpx.post(server.url + "/api/generate", json=body, timeout=240)

    httpx.post(server.url + "/api/generate", json={**body, "options": {"num_predict": 1}}, timeout=120)  # loaded
    with ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(one, range(40)))
    codes = [r.status_code for r in responses]
    busy = [r for r in responses if r.status_code == 503]
    ok = [r for r in responses if r.status_code == 200]
    assert busy and ok and len(busy) + len(ok) == 40, codes
    assert all("server busy" in r.json()["error"] for r in busy)
    assert all(r.json()["response"] == references[PROMPTS[5]] for r in ok)
    after = one(0)
    assert after.status_code == 200 and after.json()["response"] == references[PROMPTS[5]]
