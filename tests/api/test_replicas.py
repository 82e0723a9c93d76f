"""Issue 6 "Load balancing" through the real server: `serve --local-nodes 2 --max-replicas 2` places two copies of
the tiny model on disjoint Ray nodes, routes requests over them by outstanding work and measured speed, keeps the
JSON-format constraint on whichever replica serves, and recovers one replica while the other keeps serving.

One node is made slow with the documented test hook OLLAMA_DISTRIBUTED_TEST_SLOW_NODES (service/settings.py):
every step of an executor with a shard there sleeps 0.04 s more. Greedy outputs must equal a single-copy run
(an in-process engine).
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .conftest import greedy_texts, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

PROMPTS = ["The quick brown fox", "Once upon a time", "In a distant galaxy", "Hello! How are"]
N = 24
SLOW_NODE = "node1"
SLOW_S = 0.04  # +40 ms per step: ~20 tokens/s against the fast replica's ~300-700 on the resident step loop


@pytest.fixture(scope="module")
def references(tiny_gguf: Path) -> dict[str, str]:
    return greedy_texts(tiny_gguf, PROMPTS, N)


@pytest.fixture(scope="module")
def replica_server(tmp_path_factory, tiny_gguf: Path):
    with serving(tmp_path_factory.mktemp("replicas"), tiny_gguf,
                 ["--local-nodes", "2", "--max-replicas", "2", "--strategy", "single"],
                 extra_env={"OLLAMA_DISTRIBUTED_TEST_SLOW_NODES": f"{SLOW_NODE}:{SLOW_S}"}, timeout=300) as srv:
        yield srv


def _generate(url: str, prompt: str, **extra) -> dict:
    body = {"model": "tiny", "prompt": prompt, "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": N}, **extra}
    r = httpx.post(url + "/api/generate", json=body, timeout=240)
    assert r.status_code == 200, r.text
    return r.json()


def _model(srv) -> dict:
    status = httpx.get(srv.url + "/api/distributed/status", timeout=120).json()
    return next(m for m in status["models"] if m["name"] == "tiny:latest")


def _nodes_of(plan: dict) -> set[str]:
    return {sh["node"] for st in plan["stages"] for sh in st["shards"]}


def test_two_replicas_on_disjoint_nodes_shown_everywhere(replica_server, references) -> None:
    srv = replica_server
    assert _generate(srv.url, PROMPTS[0])["response"] == references[PROMPTS[0]]
    model = _model(srv)
    plans = model["plans"]
    assert len(plans) == 2, plans
    assert _nodes_of(plans[0]).isdisjoint(_nodes_of(plans[1])), plans
    assert {n for p in plans for n in _nodes_of(p)} == {"node0", "node1"}
    assert len(model["engine"]["replicas"]) == 2
    ps = httpx.get(srv.url + "/api/ps", timeout=30).json()["models"]
    entry = next(m for m in ps if m["name"] == "tiny:latest")
    assert len(entry["placement"]["replicas"]) == 2 and len(entry["placement"]["nodes"]) == 2, entry["placement"]
    live = httpx.get(srv.url + "/api/distributed/live", timeout=30).json()["models"]["tiny:latest"]
    assert len(live["replicas"]) == 2  # the dashboard's live JSON carries the per-replica counters


def test_fast_replica_serves_the_larger_share_outputs_identical(replica_server, references) -> None:
    srv = replica_server
    before = _model(srv)
    plans = before["plans"]
    slow_i = next(i for i, p in enumerate(plans) if SLOW_NODE in _nodes_of(p))
    fast_i = 1 - slow_i
    served0 = [r["served"] for r in before["engine"]["replicas"]]

    def one(i: int) -> tuple[str, str]:
        # the first 4 arrive together, so the fast replica is busy when the second comes and the router must use
        # the slow one (unmeasured, assumed as fast as the known one); the rest arrive over time, so it sees speeds
        # and queues evolve. (Staggered from the first, a fast replica that finishes each request within the 50 ms
        # gap takes them all: the slow one is never measured.)
        time.sleep(0.05 * max(0, i - 3))
        p = PROMPTS[i % len(PROMPTS)]
        return p, _generate(srv.url, p)["response"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    for p, text in results:
        assert text == references[p], p
    reps = _model(srv)["engine"]["replicas"]
    fast_n = reps[fast_i]["served"] - served0[fast_i]
    slow_n = reps[slow_i]["served"] - served0[slow_i]
    print(f"\nshare: fast replica {fast_n}, slow replica ({SLOW_NODE}, +{SLOW_S * 1e3:.0f} ms/step) {slow_n}; EMA tokens/s "
          f"{reps[fast_i]['ema_tokens_per_s']} vs {reps[slow_i]['ema_tokens_per_s']}")  # None: not measured
    assert fast_n + slow_n == 32
    assert slow_n >= 1, reps  # measured and used, not starved
    assert fast_n > 1.5 * slow_n, reps
    assert reps[fast_i]["ema_tokens_per_s"] > reps[slow_i]["ema_tokens_per_s"], reps


def test_json_format_applies_on_whichever_replica_serves(replica_server) -> None:
    srv = replica_server
    before = [r["served"] for r in _model(srv)["engine"]["replicas"]]
    outs: list[str] = []
    # The slow replica is ~15-35x slower, so the router sends it a short request only while the fast one has more
    # than that many requests' work queued: 8 long free-text requests (1600 tokens, all routed to the fast replica)
    # go first, then the burst of JSON requests; bursts repeat (at most 5) until both replicas served some.
    long = {"temperature": 0, "num_predict": 200}
    for burst in range(5):
        prompts = [f"Describe item {burst * 8 + i} as JSON:" for i in range(8)]
        with ThreadPoolExecutor(16) as pool:
            fillers = [pool.submit(_generate, srv.url, p, options=long) for p in PROMPTS * 2]
            time.sleep(0.5)  # routed and decoding before the burst arrives
            outs += pool.map(lambda p: _generate(srv.url, p, format="json")["response"], prompts)
            [f.result() for f in fillers]
        after = [r["served"] for r in _model(srv)["engine"]["replicas"]]
        if all(a > b for a, b in zip(after, before)):
            break
    assert all(a > b for a, b in zip(after, before)), (before, after, _model(srv)["engine"]["replicas"])  # both served
    for text in outs:
        json.loads(text)  # constrained output parses, on either replica


def test_replica_worker_killed_recovers_on_its_own_node(replica_server, references) -> None:
    srv = replica_server
    plans = _model(srv)["plans"]
    # the fast replica: the router prefers it, so the next requests meet the dead worker
    fast_i = next(i for i, p in enumerate(plans) if SLOW_NODE not in _nodes_of(p))
    victim = plans[fast_i]["stages"][0]["shards"][0]
    other_nodes = _nodes_of(plans[1 - fast_i])
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(0.5)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: (p, _generate(srv.url, p)["response"]), PROMPTS * 2))
    for p, text in results:
        assert text == references[p]
    model = _model(srv)
    assert len(model["plans"]) == 2, model["plans"]
    pids = {sh["pid"] for p in model["plans"] for st in p["stages"] for sh in st["shards"]}
    assert victim["pid"] not in pids
    # the re-placed replica stays off the other replica's node
    assert _nodes_of(model["plans"][0]).isdisjoint(_nodes_of(model["plans"][1])), model["plans"]
    assert {n for p in model["plans"] for n in _nodes_of(p)} >= other_nodes
    recs = httpx.get(srv.url + "/api/distributed/status", timeout=60).json()["recovery"]["models"]["tiny:latest"]
    assert recs["recoveries"] and recs["recoveries"][-1]["error"] is None, recs


@pytest.fixture(scope="module")
def long_references(tiny_gguf: Path) -> dict[str, str]:
    """200-token greedy texts of test_fault_tolerance's prompts (chosen clear of near-ties there)."""
    from .test_fault_tolerance import N_PREDICT, PROMPTS as LONG

    return greedy_texts(tiny_gguf, LONG, N_PREDICT)


def test_replica_on_a_lost_node_is_dropped_others_keep_serving(replica_server, references, long_references) -> None:
    """node1 (not the head) dies with its raylet and shard process while its replica streams requests; the only
    other node holds the other replica, so the lost replica cannot be re-placed: it is dropped, its requests move
    to the survivor and finish there with the text of an uninterrupted run, and requests sent all along are
    served by the survivor."""
    from .test_fault_tolerance import Stream, _kill_node

    srv = replica_server
    plans = _model(srv)["plans"]
    lost = next(p for p in plans if "node1" in _nodes_of(p))
    shards = [sh for st in lost["stages"] for sh in st["shards"]]
    # more long streams than the fast replica takes (OLLAMA_NUM_PARALLEL 4 running + OLLAMA_MAX_QUEUE 16
    # waiting): the rest go to the slow replica, which the router otherwise rightly leaves idle
    streams = [Stream(srv.url, p) for p in list(long_references) * 3]
    deadline = time.monotonic() + 60
    while not _model(srv)["engine"]["replicas"][plans.index(lost)]["live"]:
        assert time.monotonic() < deadline, "the router sent the slow replica nothing"
        time.sleep(0.05)
    _kill_node(shards[0]["node_id"], [sh["pid"] for sh in shards])
    deadline = time.monotonic() + 120
    while len(_model(srv)["plans"]) != 1:
        assert time.monotonic() < deadline, srv.log()[-3000:]
        p = PROMPTS[int(time.monotonic()) % len(PROMPTS)]
        assert _generate(srv.url, p)["response"] == references[p]
    model = _model(srv)
    assert "node1" not in _nodes_of(model["plans"][0])
    rec = httpx.get(srv.url + "/api/distributed/status", timeout=60).json()["recovery"]["models"]["tiny:latest"]
    assert rec["dropped_replicas"] in (0, 1), rec  # 0 once the dropped replica's engine was closed
    events = httpx.get(srv.url + "/api/distributed/events", params={"kind": "replica_dropped"}, timeout=30)
    assert events.json()["events"], srv.log()[-3000:]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: (p, _generate(srv.url, p)["response"]), PROMPTS))
    assert all(text == references[p] for p, text in results)
    for s in streams:
        text = s.join()
        assert s.final is not None and "error" not in s.final, (s.final, srv.log()[-3000:])
        assert text == long_references[s.prompt], f"{s.prompt!r}: text differs after the hand-over"
    assert "handed" in srv.log() and "adopted" in srv.log(), srv.log()[-3000:]
