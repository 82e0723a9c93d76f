"""Replica plumbing without a cluster: the settings and CLI-facing parsing, the router's locked submission that
puts a JSON-format constraint on the replica that serves the request (two real engines of the tiny model), and the
per-replica health view that keeps a re-placed replica off the others' nodes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.runtime.engine import InferenceEngine
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.recovery import NodeHealth
from ollama_distributed.runtime.requests import GenerationRequest
from ollama_distributed.service.grammar import GrammarConstraint, compile_format
from ollama_distributed.service.live_executor import LiveExecutor
from ollama_distributed.service.replicas import ReplicaHealth, RoutedExecutors
from ollama_distributed.service.router import ReplicaRouter, SlowedExecutor
from ollama_distributed.service.settings import ServerSettings, parse_slow_nodes

pytestmark = pytest.mark.timeout(180)


def test_replica_settings_from_env_and_validation() -> None:
    s = ServerSettings.from_env({})
    assert (s.max_replicas, s.autotune, s.replan, s.test_slow_nodes) == (1, True, True, ())
    s = ServerSettings.from_env({"OLLAMA_DISTRIBUTED_MAX_REPLICAS": "0", "OLLAMA_DISTRIBUTED_AUTOTUNE": "false",
                                 "OLLAMA_DISTRIBUTED_REPLAN": "0",
                                 "OLLAMA_DISTRIBUTED_TEST_SLOW_NODES": "node1:0.05, node2:0"})
    assert (s.max_replicas, s.autotune, s.replan) == (0, False, False)
    assert s.test_slow_nodes == (("node1", 0.05), ("node2", 0.0))
    assert ServerSettings.from_env({"OLLAMA_DISTRIBUTED_AUTOTUNE": "0"}, autotune=True).autotune  # CLI wins
    with pytest.raises(ValueError, match="max_replicas must be >= 0"):
        ServerSettings(max_replicas=-1)
    with pytest.raises(ValueError, match="autotune_candidates"):
        ServerSettings(autotune_candidates=4)
    with pytest.raises(ValueError, match="not a boolean"):
        ServerSettings.from_env({"OLLAMA_DISTRIBUTED_AUTOTUNE": "maybe"})
    with pytest.raises(ValueError, match="NODE:SECONDS"):
        parse_slow_nodes("node1")
    with pytest.raises(ValueError, match="NODE:SECONDS"):
        parse_slow_nodes("node1:-2")


def test_replica_health_adds_the_other_replicas_nodes() -> None:
    shared = NodeHealth()
    shared.drain("node3")
    view = ReplicaHealth(shared, lambda: {"node0", "node1"})
    assert view.backed_off() == {"node0", "node1", "node3"}
    assert view.policy is shared.policy
    view.record_failure("node2")
    assert "node2" in shared.to_dict()


def test_json_constraint_lands_on_the_replica_that_serves(tiny_gguf: Path) -> None:
    """Replica 0 is busy (a slowed long request), so the router sends the JSON request to replica 1; the
    constraint travels with the request, so replica 1's output is a JSON object. The facade's lock is the
    router's locked submission: the serving replica cannot step until the block ends."""
    tok = Tokenizer.from_gguf(tiny_gguf)
    execs = [LiveExecutor(SlowedExecutor(LocalExecutor(tiny_gguf), 0.02), tok),
             LiveExecutor(LocalExecutor(tiny_gguf), tok)]
    engines = [InferenceEngine(e, tok, max_batch=4) for e in execs]
    router = ReplicaRouter(engines, executors=execs)
    facade = RoutedExecutors(router)
    try:
        busy = router.submit(GenerationRequest(prompt_ids=tok.encode("Once upon a time"),
                                               options=GenerationOptions(temperature=0, num_predict=64)))
        opts = GenerationOptions(temperature=0, num_predict=40)
        req = GenerationRequest(prompt_ids=tok.encode("Give me JSON:"), options=opts,
                                constraint=GrammarConstraint(compile_format("json"), tok, 40))
        with facade.lock:
            handle = router.submit(req)
            served = router.held_replica()
            assert served.executor.lock.locked()
        assert served.index == 1, router.stats()
        assert not execs[1].lock.locked()
        text = handle.result(timeout=120).text
        assert isinstance(json.loads(text), dict), text
        assert busy.result(timeout=120).text
        assert facade.config.vocab_size == execs[0].config.vocab_size
    finally:
        router.close()


def test_router_add_and_remove_replicas(tiny_gguf: Path) -> None:
    tok = Tokenizer.from_gguf(tiny_gguf)
    a, b = (InferenceEngine(LocalExecutor(tiny_gguf), tok) for _ in range(2))
    router = ReplicaRouter([a])
    try:
        rep = router.add(b)
        assert [r.index for r in router.replicas] == [0, 1] and rep.engine is b
        assert router.remove(a) is not None and [r.engine for r in router.replicas] == [b]
        assert router.remove(a) is None
        with pytest.raises(ValueError, match="last replica"):
            router.remove(b)
        h = router.submit(GenerationRequest(prompt_ids=tok.encode("Hi"), options=GenerationOptions(num_predict=3)))
        h.result(timeout=60)
        stats = router.stats()
        assert stats["replicas"][0]["served"] == 1 and stats["steps"] >= 1 and "engine" in stats["replicas"][0]
        done = threading.Event()
        threading.Thread(target=lambda: (router.embedding("hello"), done.set()), daemon=True).start()
        assert done.wait(60)
    finally:
        a.close()
        router.close()
