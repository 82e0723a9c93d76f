"""Issue 6: a node that hangs without dying. A pipeline stage's worker process is SIGSTOPped mid-stream (no Ray
call fails, no socket closes): the adaptive step time-out finds it within seconds (runtime/step_timeout.py:
floor 2 s + liveness probe 1.5 s by default, not the fixed 300 s it replaces), the worker is killed, the model is
re-placed and the stream completes with exactly the text of a run without the failure."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from ollama_distributed.runtime.step_timeout import StepTimeout
from tests.helpers.processes import release

# pipeline_server: 2 nodes of 34 MiB, so the tiny model takes 2 pipeline stages (one per node). Imported as a
# module-scoped fixture, this module gets its own server.
from .test_fault_tolerance import PROMPTS, Stream, _recoveries, _shards, pipeline_server, references  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEFAULT = StepTimeout()
# detection (floor + probe) plus re-placing and the replay, with room for a loaded 2-core machine
HANG_TO_TOKEN_LIMIT_S = DEFAULT.floor_s + DEFAULT.probe_s + 25.0


def test_sigstopped_stage_worker_is_detected_and_the_stream_completes(pipeline_server, references) -> None:
    srv = pipeline_server
    s = Stream(srv.url, PROMPTS[2])
    s.wait_tokens(40)
    shards = _shards(srv)
    assert len({sh["stage"] for sh in shards}) == 2
    victim = shards[-1]
    before = _recoveries(srv)
    t_stop = time.perf_counter()
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        text = s.join()
        gap = s.stall_after(t_stop)
        # the server killed the stopped process (a stopped process still exists; a killed one is gone or a zombie)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(victim["pid"]) and time.monotonic() < deadline:
            try:
                if psutil.Process(victim["pid"]).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        alive = psutil.pid_exists(victim["pid"]) and psutil.Process(victim["pid"]).status() != psutil.STATUS_ZOMBIE
    finally:
        release(victim["pid"])
    assert s.final is not None and "error" not in s.final, (s.final, srv.log()[-3000:])
    assert text == references[PROMPTS[2]], srv.log()[-3000:]
    assert not alive, "the hung worker was left running (stopped)"
    assert _recoveries(srv) == before + 1
    last = httpx.get(srv.url + "/api/distributed/status", timeout=60).json()["recovery"]["models"]["tiny:latest"][
        "recoveries"][-1]
    assert last["kind"] == "hung" and victim["node"] in last["detail"] and last["error"] is None, last
    bound = DEFAULT.floor_s + DEFAULT.probe_s
    print(f"\nSIGSTOP of a stage worker → next token: {gap:.2f} s (detection bound {bound} s)")
    assert DEFAULT.floor_s < gap < HANG_TO_TOKEN_LIMIT_S
    assert victim["pid"] not in {sh["pid"] for sh in _shards(srv)}
