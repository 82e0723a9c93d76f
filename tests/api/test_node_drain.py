"""Issue 6: `ollama-distributed node drain NODE` moves a model off a node while a streamed greedy generation runs:
the stream completes with exactly the text of a run without the drain, no shard stays on the node, nothing is
planned on it afterwards, and unknown nodes are a clean 404."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from .conftest import CLI
# node_server: 3 nodes of 34 MiB, so the tiny model (~40 MB f32) takes 2 pipeline stages and one node is spare.
# Imported as a module-scoped fixture, this module gets its own server (the fault tests kill nodes of theirs).
from .test_fault_tolerance import PROMPTS, Stream, _shards, node_server, references  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_drain_moves_the_model_without_failing_the_stream(node_server, references) -> None:
    srv = node_server
    s = Stream(srv.url, PROMPTS[0])
    s.wait_tokens(30)
    before = _shards(srv)
    victim = before[-1]["node"]  # a node holding a stage
    env = dict(os.environ, OLLAMA_HOST=srv.host)
    t0 = time.perf_counter()
    r = subprocess.run([*CLI, "node", "drain", victim], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stderr, srv.log()[-3000:])
    assert f"drained {victim}: tiny:latest" in r.stdout
    drained_s = time.perf_counter() - t0
    text = s.join()
    assert s.final is not None and "error" not in s.final, (s.final, srv.log()[-3000:])
    assert text == references[PROMPTS[0]]
    after = _shards(srv)
    assert victim not in {sh["node"] for sh in after}, after
    assert {sh["pid"] for sh in after}.isdisjoint({sh["pid"] for sh in before if sh["node"] == victim})
    status = httpx.get(srv.url + "/api/distributed/status", timeout=120).json()
    assert status["recovery"]["nodes"][victim]["drained"] is True
    print(f"\ndrain of {victim} took {drained_s:.2f} s while streaming")
    # a new request runs on the remaining nodes, and the drained node stays out of the plan
    r2 = httpx.post(srv.url + "/api/generate", json={"model": "tiny", "prompt": PROMPTS[1], "raw": True,
                                                     "stream": False, "options": {"temperature": 0,
                                                                                  "num_predict": 200}},
                    timeout=240)
    assert r2.status_code == 200 and r2.json()["response"] == references[PROMPTS[1]]
    assert victim not in {sh["node"] for sh in _shards(srv)}


def test_drain_unknown_node_is_404(node_server) -> None:
    r = httpx.post(node_server.url + "/api/distributed/nodes/no-such-node/drain", timeout=60)
    assert r.status_code == 404 and "not found" in r.json()["error"]
