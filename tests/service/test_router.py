"""ReplicaRouter over two real engines of the tiny model, one slowed by the SlowedExecutor test hook: the fast
replica serves the larger share, every answer equals the reference, and a full replica is skipped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.runtime.engine import InferenceEngine
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.requests import GenerationRequest
from ollama_distributed.service.router import ReplicaRouter, RouterConfig, SlowedExecutor

pytestmark = pytest.mark.timeout(180)

PROMPTS = ["The quick brown fox", "Once upon a time", "In a distant galaxy", "Hello! How are"]


def _req(tok, prompt: str, n: int = 24) -> GenerationRequest:
    return GenerationRequest(prompt_ids=tok.encode(prompt), options=GenerationOptions(temperature=0, num_predict=n))


def test_fast_replica_serves_the_larger_share(tiny_gguf: Path) -> None:
    tok = Tokenizer.from_gguf(tiny_gguf)
    with InferenceEngine(LocalExecutor(tiny_gguf), tok) as ref:
        want = {p: ref.generate(_req(tok, p)).text for p in PROMPTS}
    fast = InferenceEngine(LocalExecutor(tiny_gguf), tok, name="fast")
    slow = InferenceEngine(SlowedExecutor(LocalExecutor(tiny_gguf), 0.04), tok, name="slow")
    router = ReplicaRouter([fast, slow], RouterConfig(sample_s=0.1))
    try:
        handles = []
        for i in range(32):
            p = PROMPTS[i % len(PROMPTS)]
            handles.append((p, router.submit(_req(tok, p))))
            time.sleep(0.03)  # requests arrive over time, so the router sees speeds and queues evolve
        for p, h in handles:
            assert h.result(timeout=120).text == want[p]
        stats = router.stats()["replicas"]
        fast_n, slow_n = stats[0]["served"], stats[1]["served"]
        assert fast_n + slow_n == 32
        assert stats[0]["ema_tokens_per_s"] > stats[1]["ema_tokens_per_s"], stats
        assert fast_n > 1.5 * slow_n, stats  # not an equal share
        assert slow_n >= 1  # the slow replica is measured and used, not starved by an unknown prior
        assert all(s["live"] == 0 and s["outstanding"] == 0 for s in stats)
    finally:
        router.close()


def test_equal_replicas_share_and_full_replica_is_skipped(tiny_gguf: Path) -> None:
    tok = Tokenizer.from_gguf(tiny_gguf)
    # max_batch 1, max_queue 0: each replica holds exactly one request, so a third concurrent one finds both full
    a = InferenceEngine(SlowedExecutor(LocalExecutor(tiny_gguf), 0.02), tok, max_batch=1, max_queue=0)
    b = InferenceEngine(SlowedExecutor(LocalExecutor(tiny_gguf), 0.02), tok, max_batch=1, max_queue=0)
    router = ReplicaRouter([a, b])
    try:
        h1 = router.submit(_req(tok, PROMPTS[0], 40))
        h2 = router.submit(_req(tok, PROMPTS[1], 40))
        assert [s["served"] for s in router.stats()["replicas"]] == [1, 1]  # least outstanding work
        time.sleep(0.2)
        from ollama_distributed.runtime.requests import QueueFullError

        with pytest.raises(QueueFullError):
            router.submit(_req(tok, PROMPTS[2], 4))
        h1.result(timeout=60), h2.result(timeout=60)
        router.submit(_req(tok, PROMPTS[2], 4)).result(timeout=60)  # capacity back: served again
    finally:
        router.close()


def test_idle_unmeasured_replica_wins_the_tie(tiny_gguf: Path) -> None:
    """Requests that each finish before the next arrives: the measured replica is idle every time, its score
    ties with the unmeasured one's (whose speed is the measured mean), and the unmeasured one is tried first."""
    tok = Tokenizer.from_gguf(tiny_gguf)
    engines = [InferenceEngine(LocalExecutor(tiny_gguf), tok, name=n) for n in ("a", "b")]
    router = ReplicaRouter(engines, RouterConfig(sample_s=0.01))
    try:
        router.submit(_req(tok, PROMPTS[0], 16)).result(timeout=60)
        first = router.stats()["replicas"]
        assert [s["served"] for s in first] == [1, 0]  # neither measured: index order
        assert first[0]["ema_tokens_per_s"] is not None and first[1]["ema_tokens_per_s"] is None, first
        router.submit(_req(tok, PROMPTS[1], 16)).result(timeout=60)
        assert [s["served"] for s in router.stats()["replicas"]] == [1, 1]
    finally:
        router.close()


def test_requests_shorter_than_a_sample_still_measure_the_replica(tiny_gguf: Path) -> None:
    """A replica whose requests each finish within `sample_s` is measured once their busy time adds up to it,
    and the idle gaps between them do not count as slowness (a window that restarted with every request left a
    fast replica unmeasured for good, and the router then could not tell it from a slow one)."""
    tok = Tokenizer.from_gguf(tiny_gguf)
    engine = InferenceEngine(LocalExecutor(tiny_gguf), tok)
    engine.generate(_req(tok, PROMPTS[0], 16))  # warm: the first request of an engine is slower
    t0 = time.perf_counter()
    engine.generate(_req(tok, PROMPTS[0], 16))  # not routed: the router sees only what it submits
    one = time.perf_counter() - t0
    router = ReplicaRouter([engine], RouterConfig(sample_s=2.5 * one))
    try:
        took, emas = [], []
        for i in range(8):
            t0 = time.perf_counter()
            router.submit(_req(tok, PROMPTS[i % len(PROMPTS)], 16)).result(timeout=60)
            took.append(time.perf_counter() - t0)
            emas.append(router.stats()["replicas"][0]["ema_tokens_per_s"])
            time.sleep(2 * one)  # idle between requests, twice as long as a request
        assert emas[0] is None or took[0] >= 2.5 * one, (emas, took, one)  # one short request is no sample
        assert emas[-1] is not None, (emas, took, one)
        # busy time only: about the client's view of the rate (its timings hold the busy ones); a window that
        # counted the idle gaps would give a third of it at most
        assert emas[-1] >= 0.6 * 16 * len(took) / sum(took), (emas, took)
    finally:
        router.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replicas_on_a_real_cluster_one_slowed(tiny_gguf: Path, ray_cluster) -> None:
    """Local Ray nodes that each hold the whole tiny model: the scheduler places two replicas on disjoint
    nodes; with one slowed (test hook) the router gives the other the larger share, answers stay exact."""
    from ollama_distributed.service.router import build_replica_executors

    tok = Tokenizer.from_gguf(tiny_gguf)
    with InferenceEngine(LocalExecutor(tiny_gguf), tok) as ref:
        want = {p: ref.generate(_req(tok, p)).text for p in PROMPTS}
    executors = build_replica_executors(tiny_gguf, ray_cluster, "single", max_replicas=2)
    assert len(executors) == 2
    nodes = [{s["node"] for st in ex.placement()["stages"] for s in st["shards"]} for ex in executors]
    assert not nodes[0] & nodes[1], nodes
    engines = [InferenceEngine(executors[0], tok), InferenceEngine(SlowedExecutor(executors[1], 0.05), tok)]
    router = ReplicaRouter(engines, RouterConfig(sample_s=0.1))
    try:
        handles = []
        for i in range(24):
            p = PROMPTS[i % len(PROMPTS)]
            handles.append((p, router.submit(_req(tok, p))))
            time.sleep(0.03)
        for p, h in handles:
            assert h.result(timeout=120).text == want[p]
        served = [s["served"] for s in router.stats()["replicas"]]
        assert served[0] > 1.5 * served[1] and served[1] >= 1, router.stats()
    finally:
        router.close()
