"""InferenceEngine over the real LocalExecutor: equality with a direct greedy loop, continuous batching,
cancellation, queue bounds, stop strings, limits, seeds, errors, async streaming, embeddings."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.runtime.engine import (
    ContextLengthError,
    EngineClosedError,
    GenerationError,
    GenerationRequest,
    InferenceEngine,
    QueueFullError,
    truncate_prompt,
)
from ollama_distributed.runtime.local_executor import LocalExecutor

GREEDY = GenerationOptions(temperature=0.0)


def greedy_reference(shard: ModelShard, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    """Plain loop: one forward of the prompt, then argmax / feed back, stopping at an end-of-generation token."""
    cache = shard.new_cache(len(prompt) + n + 1)
    logits = shard.forward(torch.tensor(prompt), [0], [len(prompt)], cache)
    out: list[int] = []
    for _ in range(n):
        tok = int(torch.argmax(logits[0]))
        if tok in eos:
            break
        out.append(tok)
        logits = shard.forward(torch.tensor([tok]), [0], [1], cache)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_gguf)


@pytest.fixture(scope="module")
def shard(tiny_gguf) -> ModelShard:
    return ModelShard.from_file(tiny_gguf)


@pytest.fixture(scope="module")
def engine(tiny_gguf, tokenizer):
    eng = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=1024), tokenizer, max_batch=16, max_queue=64)
    yield eng
    eng.close()


def _prompts(tokenizer: Tokenizer) -> list[list[int]]:
    texts = [
        "Why is the sky blue?",
        "hi",
        "Write a haiku about distributed systems and the latency of networks between racks.",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "¿Dónde está la biblioteca? 图书馆在哪里？",
        "The quick brown fox jumps over the lazy dog. " * 6,
        "1 2 3 4 5",
        "Tell me a story.",
    ]
    return [tokenizer.encode(t) for t in texts]


def test_engine_greedy_equals_direct_loop(engine, shard, tokenizer):
    for prompt in _prompts(tokenizer)[:3]:
        res = engine.generate(GenerationRequest(prompt, GREEDY.merged({"num_predict": 24})))
        ref = greedy_reference(shard, prompt, 24, tokenizer.eos_ids)
        assert res.token_ids == ref
        assert res.text == tokenizer.decode(ref, skip_special=True)
        assert res.done_reason == ("length" if len(ref) == 24 else "stop")
        assert res.eval_count == len(ref) and res.prompt_eval_count == len(prompt)
        assert res.total_duration_ns >= res.eval_duration_ns > 0


def test_concurrent_requests_equal_solo_runs(engine, tokenizer):
    prompts = _prompts(tokenizer)
    opts = [
        {"temperature": 0, "num_predict": 30},
        {"temperature": 0, "num_predict": 5},
        {"seed": 11, "num_predict": 17},
        {"seed": 12, "temperature": 1.2, "top_k": 0, "top_p": 1.0, "num_predict": 25},
        {"temperature": 0, "repeat_penalty": 1.3, "num_predict": 20, "num_batch": 4},
        {"seed": 3, "min_p": 0.05, "typical_p": 0.7, "num_predict": 12, "num_batch": 7},
        {"temperature": 0, "num_predict": 1},
        {"seed": 99, "presence_penalty": 0.5, "frequency_penalty": 0.5, "num_predict": 22},
    ]
    reqs = [GenerationRequest(p, GenerationOptions.from_dict(o)) for p, o in zip(prompts, opts)]
    solo = [engine.generate(r) for r in reqs]
    steps_before = engine.steps
    handles = [engine.submit(r) for r in reqs]
    together = [h.result() for h in handles]
    for a, b in zip(solo, together):
        assert a.token_ids == b.token_ids and a.text == b.text and a.done_reason == b.done_reason
    # they really shared steps: far fewer steps than the sum of their tokens
    total_tokens = sum(len(r.token_ids) for r in solo)
    assert engine.steps - steps_before < total_tokens


def test_seeded_sampling_reproducible_and_seed_matters(engine, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    o = GenerationOptions(seed=1234, temperature=1.0, top_k=0, top_p=1.0, num_predict=20)
    a = engine.generate(GenerationRequest(prompt, o))
    b = engine.generate(GenerationRequest(prompt, o))
    c = engine.generate(GenerationRequest(prompt, o.merged({"seed": 4321})))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_num_predict_and_context_limits(engine, tokenizer):
    prompt = tokenizer.encode("Count with me: one two three")
    r = engine.generate(GenerationRequest(prompt, GREEDY.merged({"num_predict": 7})))
    assert (len(r.token_ids), r.eval_count, r.done_reason) == (7, 7, "length")
    r0 = engine.generate(GenerationRequest(prompt, GREEDY.merged({"num_predict": 0})))
    assert (r0.token_ids, r0.text, r0.done_reason, r0.eval_count) == ([], "", "length", 0)
    assert r0.prompt_eval_count == len(prompt)
    # num_ctx bounds prompt + generated, also for num_predict -1 and -2
    for n in (-1, -2):
        rc = engine.generate(GenerationRequest(prompt, GREEDY.merged({"num_ctx": len(prompt) + 5, "num_predict": n})))
        assert (len(rc.token_ids), rc.done_reason) == (5, "length")


def test_context_shift_keeps_generating(engine, tokenizer, shard):
    prompt = tokenizer.encode("Count with me: one two three four")
    num_ctx, keep = 24, 4
    opts = GREEDY.merged({"num_ctx": num_ctx, "num_keep": keep, "num_predict": 40})
    plain = engine.generate(GenerationRequest(prompt, opts))
    shifted = engine.generate(GenerationRequest(prompt, opts, shift=True))
    room = num_ctx - len(prompt)
    assert plain.done_reason == "length" and len(plain.token_ids) == room
    assert shifted.done_reason == "length" and len(shifted.token_ids) == 40
    assert shifted.token_ids[:room] == plain.token_ids
    # the token after the first shift is the greedy continuation of the shortened context
    history = prompt + shifted.token_ids[:room]
    discard = (len(history) - keep) // 2
    context = history[:keep] + history[keep + discard :]
    assert shifted.token_ids[room] == greedy_reference(shard, context, 1, set())[0]


def test_prompt_truncated_like_ollama(engine, tokenizer, shard):
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)
    num_ctx, keep = 32, 4
    opts = GREEDY.merged({"num_ctx": num_ctx, "num_keep": keep, "num_predict": 6})
    r = engine.generate(GenerationRequest(prompt, opts))
    cut = prompt[:keep] + prompt[len(prompt) - (num_ctx - keep) :]
    assert truncate_prompt(prompt, num_ctx, keep) == cut
    assert r.prompt_eval_count == num_ctx
    # a full context leaves room for exactly one sampled token
    assert r.token_ids == greedy_reference(shard, cut, 1, tokenizer.eos_ids) and r.done_reason == "length"
    with pytest.raises(ContextLengthError, match=f"{len(prompt)} tokens"):
        engine.submit(GenerationRequest(prompt, opts, truncate=False))


def test_stop_string_spanning_tokens(engine, tokenizer):
    prompt = tokenizer.encode("Why is the sky blue?")
    base = GREEDY.merged({"num_predict": 24})
    full = engine.generate(GenerationRequest(prompt, base))
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of one token's text and the start of the next one's
    k = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    first = full.text.find(stop)
    assert 0 <= first
    handle = engine.submit(GenerationRequest(prompt, base.merged({"stop": ["never-there", stop]})))
    chunks = list(handle)
    text = "".join(c.text for c in chunks)
    assert text == full.text[:first] and chunks[-1].done_reason == "stop"
    assert stop not in text


def test_cancel_frees_the_cache(engine, tokenizer):
    ex = engine.executor
    h = engine.submit(GenerationRequest(tokenizer.encode("Go on forever"), GREEDY.merged({"num_predict": 100000})))
    it = iter(h)
    for _ in range(3):
        assert not next(it).done
    assert h.seq_id in ex.cached_sequences()
    h.cancel()
    last = list(it)[-1]
    assert last.done and last.done_reason == "cancel" and last.eval_count >= 3
    assert h.seq_id not in ex.cached_sequences()
    # leaving an iteration early cancels too
    h2 = engine.submit(GenerationRequest(tokenizer.encode("Again"), GREEDY.merged({"num_predict": 100000})))
    for chunk in h2:
        break
    deadline = time.time() + 10
    while h2.seq_id in ex.cached_sequences() or not h2.done:
        assert time.time() < deadline, "cancelled sequence still cached"
        time.sleep(0.01)


def test_queue_full_raises(tiny_gguf, tokenizer):
    eng = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=4096), tokenizer, max_batch=1, max_queue=1)
    try:
        long = GenerationRequest(tokenizer.encode("a"), GREEDY.merged({"num_predict": 100000}))
        a = eng.submit(long)
        b = eng.submit(long)
        with pytest.raises(QueueFullError, match="max_queue=1"):
            eng.submit(long)
        a.cancel()
        b.cancel()
        assert a.result().done_reason == "cancel" and b.result().done_reason == "cancel"
        eng.submit(GenerationRequest(tokenizer.encode("a"), GREEDY.merged({"num_predict": 2}))).result()
    finally:
        eng.close()


def test_long_prompt_prefill_does_not_stall_decoding(tiny_gguf, tokenizer):
    eng = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=2048), tokenizer, max_step_tokens=16)
    try:
        short = eng.submit(GenerationRequest(tokenizer.encode("hi"), GREEDY.merged({"num_predict": 20})))
        long_prompt = tokenizer.encode("word " * 900)
        long = eng.submit(GenerationRequest(long_prompt, GREEDY.merged({"num_predict": 3, "num_batch": 16})))
        assert len(short.result().token_ids) == 20 or short.result().done_reason == "stop"
        assert not long.done  # still prefilling 16 tokens per step while `short` decoded every step
        r = long.result()
        assert r.prompt_eval_count == len(long_prompt) and len(r.token_ids) == 3
    finally:
        eng.close()


def test_chunked_prefill_same_tokens(engine, tokenizer):
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 5)
    a = engine.generate(GenerationRequest(prompt, GREEDY.merged({"num_predict": 10})))
    b = engine.generate(GenerationRequest(prompt, GREEDY.merged({"num_predict": 10, "num_batch": 3})))
    assert a.token_ids == b.token_ids


def test_async_iteration_streams_same_chunks(engine, tokenizer):
    req = GenerationRequest(tokenizer.encode("Why is the sky blue?"), GREEDY.merged({"num_predict": 12}))
    sync_chunks = list(engine.submit(req))

    async def consume():
        return [c async for c in engine.submit(req)]

    async_chunks = asyncio.run(consume())
    assert [c.text for c in async_chunks] == [c.text for c in sync_chunks]
    assert async_chunks[-1].done and sum(1 for c in async_chunks if c.done) == 1

    async def abandon():
        h = engine.submit(GenerationRequest(req.prompt_ids, GREEDY.merged({"num_predict": 100000})))
        agen = h.__aiter__()
        await agen.__anext__()
        await agen.aclose()  # a client disconnect
        return h

    h = asyncio.run(abandon())
    deadline = time.time() + 10
    while h.seq_id in engine.executor.cached_sequences():
        assert time.time() < deadline
        time.sleep(0.01)


def test_coalesced_consumer_is_woken_once_and_gets_the_same_chunks(engine, tokenizer, monkeypatch):
    """A caller that answers at the end (`coalesce`, as the non-streaming API does) takes one hand-off for the
    whole request instead of one per token, and still gets every chunk, stamped with the engine's times."""
    from ollama_distributed.runtime import requests as rq

    req = GenerationRequest(tokenizer.encode("Why is the sky blue?"), GREEDY.merged({"num_predict": 12}))
    streamed = list(engine.submit(req))
    wakes = []
    real = rq._wake_waiter
    monkeypatch.setattr(rq, "_wake_waiter", lambda w: (wakes.append(1), real(w)))
    gate = threading.Event()
    blocker = threading.Thread(target=engine._call_on_loop, args=(gate.wait,))
    blocker.start()  # the engine thread waits on the gate, so the consumer below waits before any token exists

    async def consume():
        h = engine.submit(req)
        h.coalesce()
        task = asyncio.ensure_future(_chunks(h))
        await asyncio.sleep(0.05)
        gate.set()
        return await task

    async def _chunks(h):
        return [c async for c in h]

    got = asyncio.run(consume())
    blocker.join(10)
    assert len(wakes) == 1
    assert [(c.text, c.token_ids) for c in got] == [(c.text, c.token_ids) for c in streamed]
    times = [c.time for c in got]
    assert times[0] > 0 and times == sorted(times)
    assert all(c.batch >= 1 for c in got if c.token_ids)


def test_many_threads_submit_concurrently(engine, tokenizer):
    prompt = tokenizer.encode("hello")
    want = engine.generate(GenerationRequest(prompt, GREEDY.merged({"num_predict": 8}))).token_ids
    got: list[list[int]] = []
    lock = threading.Lock()

    def worker():
        r = engine.generate(GenerationRequest(prompt, GREEDY.merged({"num_predict": 8})))
        with lock:
            got.append(r.token_ids)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [want] * 12


def test_embed_matches_executor(engine, tokenizer, shard):
    ids = tokenizer.encode("an embedding")
    vec = engine.embed(ids)
    hidden = shard.forward(torch.tensor(ids), [0], [len(ids)], shard.new_cache(len(ids)), output="hidden")
    assert torch.allclose(torch.tensor(vec), hidden.mean(0), atol=1e-5)
    assert engine.embed("an embedding") == vec
    res = engine.embedding(ids * 400, num_ctx=16)
    assert res.truncated and res.prompt_eval_count == 16
    with pytest.raises(ContextLengthError):
        engine.embedding(ids * 400, num_ctx=16, truncate=False)


def test_bad_requests_rejected(engine, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        engine.submit(GenerationRequest([], GREEDY))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit(GenerationRequest([1, 10**9], GREEDY))


def test_executor_failure_ends_requests_with_error_and_loop_survives(tiny_gguf, tokenizer):
    ex = LocalExecutor(tiny_gguf, max_seq_len=256)
    eng = InferenceEngine(ex, tokenizer)
    try:
        ok = eng.generate(GenerationRequest(tokenizer.encode("x"), GREEDY.merged({"num_predict": 2})))
        assert ok.done_reason in ("length", "stop")
        ex.close()  # the executor dies under the engine (as a lost node would)
        h = eng.submit(GenerationRequest(tokenizer.encode("x"), GREEDY.merged({"num_predict": 2})))
        final = list(h)[-1]
        assert final.done and final.error and "closed" in final.error
        with pytest.raises(GenerationError, match="closed"):
            eng.submit(GenerationRequest(tokenizer.encode("y"), GREEDY)).result(timeout=30)
        with pytest.raises(RuntimeError, match="closed"):
            eng.embed([1, 2])
    finally:
        eng.close()
    with pytest.raises(EngineClosedError):
        eng.submit(GenerationRequest(tokenizer.encode("x"), GREEDY))


def _interrupted_run(tiny_gguf, tokenizer, interrupt, **engine_kw):
    """Two requests (greedy, seeded) that `interrupt(engine)` disturbs after a few chunks; returns results."""
    eng = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=512), tokenizer, **engine_kw)
    try:
        reqs = [
            GenerationRequest(tokenizer.encode("Why is the sky blue?"), GREEDY.merged({"num_predict": 200})),
            GenerationRequest(tokenizer.encode("Tell me a story."), GenerationOptions(seed=5, num_predict=200)),
        ]
        handles = [eng.submit(r) for r in reqs]
        it = iter(handles[0])
        head = [next(it) for _ in range(5)]
        interrupt(eng)
        first = head + list(it)
        return reqs, [first, list(handles[1])], eng
    finally:
        eng.close()


def _joined(chunks):
    assert chunks[-1].done and chunks[-1].error is None, chunks[-1]
    return [t for c in chunks for t in c.token_ids]


def test_executor_failure_recovers_by_replay(engine, tiny_gguf, tokenizer):
    """A dead executor is replaced by `recover` and the running sequences continue exactly (issue 6's hook)."""
    replacements = []

    def recover(exc, old):
        assert "closed" in str(exc)
        replacements.append(LocalExecutor(tiny_gguf, max_seq_len=512))
        return replacements[-1]

    reqs, outs, eng = _interrupted_run(tiny_gguf, tokenizer, lambda e: e.executor.close(), recover=recover)
    for req, chunks in zip(reqs, outs):
        assert _joined(chunks) == engine.generate(req).token_ids
    assert len(replacements) == 1 and eng.replays == 2


def test_replace_executor_mid_generation(engine, tiny_gguf, tokenizer):
    olds = []

    def swap(eng):
        olds.append(eng.executor)
        eng.replace_executor(LocalExecutor(tiny_gguf, max_seq_len=512))

    reqs, outs, eng = _interrupted_run(tiny_gguf, tokenizer, swap)
    for req, chunks in zip(reqs, outs):
        assert _joined(chunks) == engine.generate(req).token_ids
    assert eng.replays == 2 and eng.executor is not olds[0]
    with pytest.raises(RuntimeError, match="closed"):
        olds[0].step([1], [[1]])


def test_unrecoverable_failure_hands_sequences_to_another_engine(engine, tiny_gguf, tokenizer):
    """A failed step that `recover` cannot mend hands every running sequence to another engine (`hand_off` →
    `adopt`, what a dropped replica does): each stream goes on from where it stopped, with the tokens of a run
    without the failure (greedy and seeded), and the first engine keeps nothing."""
    survivor = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=512), tokenizer)
    given = []

    def hand_off(seqs):
        given.extend(seqs)
        survivor.adopt(seqs)
        return True

    try:
        reqs, outs, eng = _interrupted_run(tiny_gguf, tokenizer, lambda e: e.executor.close(),
                                           recover=lambda exc, old: None, hand_off=hand_off)
        for req, chunks in zip(reqs, outs):
            assert _joined(chunks) == engine.generate(req).token_ids
        assert len(given) == 2 and survivor.adopted == 2
        # the first engine kept nothing (closing it ends no moved request), and a cancel of a moved request
        # reaches the engine that now runs it
        h = _moved_request(tiny_gguf, tokenizer, survivor)
        h.cancel()
        assert list(h._iter_sync(timeout=30))[-1].done_reason == "cancel"
    finally:
        survivor.close()


def _moved_request(tiny_gguf, tokenizer, survivor):
    """A long request on an engine whose executor then dies and which hands it to `survivor`; that engine is
    closed once the survivor has it. Returns the request's handle."""
    eng = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=4096), tokenizer,
                          hand_off=lambda seqs: survivor.adopt(seqs) is None)
    adopted = survivor.adopted
    h = eng.submit(GenerationRequest(tokenizer.encode("a"), GREEDY.merged({"num_predict": 100000})))
    chunks = iter(h)  # kept: a dropped iterator cancels its request (a client that went away)
    next(chunks)
    eng.executor.close()
    deadline = time.monotonic() + 60
    while survivor.adopted == adopted:
        assert time.monotonic() < deadline, "the request was not handed over"
        time.sleep(0.01)
    eng.close()
    return h


def test_close_ends_running_requests(tiny_gguf, tokenizer):
    eng = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=4096), tokenizer)
    h = eng.submit(GenerationRequest(tokenizer.encode("a"), GREEDY.merged({"num_predict": 100000})))
    next(iter(h))
    eng.close()
    final = list(h._iter_sync(timeout=10))[-1]
    assert final.done and final.error == "the engine was closed"


@pytest.mark.slow
def test_smollm2_engine_equals_direct_greedy_and_batches(smollm2_path):
    tok = Tokenizer.from_gguf(smollm2_path)
    ex = LocalExecutor(smollm2_path, max_seq_len=2048)
    eng = InferenceEngine(ex, tok)
    try:
        prompts = [
            tok.encode("<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"),
            tok.encode("<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n"),
            tok.encode("The capital of France is"),
        ]
        n = 24
        refs = [greedy_reference(ex.shard, p, n, tok.eos_ids) for p in prompts]
        handles = [eng.submit(GenerationRequest(p, GREEDY.merged({"num_predict": n}))) for p in prompts]
        results = [h.result() for h in handles]
        for res, ref in zip(results, refs):
            assert res.token_ids == ref
        assert "Paris" in results[2].text
        assert any(w in results[0].text.lower() for w in ("scatter", "light", "atmosphere", "sun"))
    finally:
        eng.close()
