"""Fast paths of ModelShard vs their reference paths on the same weights.

Batched decode attention (one masked SDPA over the slot range of all decode sequences) must reproduce the
per-sequence path (one SDPA per sequence): fp32 max abs error ≤ 1e-5 on the logits, with sequences of very
different lengths, slots out of order / with holes, and steps that mix prompt chunks with decode tokens.
"""

from __future__ import annotations

import pytest
import torch

from ollama_distributed.model.transformer import ModelShard


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def shard(tiny_gguf) -> ModelShard:
    return ModelShard.from_file(tiny_gguf)


def _run(shard: ModelShard, batched: bool, steps: list[tuple[list[int], list[list[int]]]], free_after: dict[int, list[int]]):
    """Feed `steps` ((seq_ids, tokens per seq)) through one fresh cache; return each step's logits."""
    shard.batched_decode = batched
    try:
        cache = shard.new_cache(512)
        out = []
        for i, (sids, toks) in enumerate(steps):
            x = torch.tensor([t for ts in toks for t in ts])
            out.append(shard.forward(x, sids, [len(ts) for ts in toks], cache))
            for sid in free_after.get(i, []):
                cache.free(sid)
        return out
    finally:
        shard.batched_decode = True


def _prompt(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _assert_same(shard: ModelShard, steps, free_after=None) -> None:
    free_after = free_after or {}
    ref = _run(shard, False, steps, free_after)
    new = _run(shard, True, steps, free_after)
    for i, (a, b) in enumerate(zip(ref, new)):
        assert a.shape == b.shape
        err = float((a - b).abs().max())
        assert err <= 1e-5, f"step {i}: batched decode differs from per-sequence by {err}"


def test_batched_decode_equals_per_sequence_ragged_lengths(shard):
    g = torch.Generator().manual_seed(0)
    vocab = shard.cfg.vocab_size
    lengths = [1, 3, 200, 37, 90, 5]  # very different cache lengths in one decode batch
    sids = list(range(len(lengths)))
    steps = [(sids, [_prompt(g, n, vocab) for n in lengths])]
    for _ in range(6):
        steps.append((sids, [_prompt(g, 1, vocab) for _ in sids]))
    _assert_same(shard, steps)


def test_batched_decode_slots_out_of_order_with_holes(shard):
    g = torch.Generator().manual_seed(1)
    vocab = shard.cfg.vocab_size
    sids = [10, 11, 12, 13, 14]
    steps = [(sids, [_prompt(g, n, vocab) for n in (4, 120, 9, 60, 2)])]
    # seq 12 is freed: slot hole in the middle; the rest decode in a scrambled order
    order = [14, 10, 13, 11]
    for _ in range(4):
        steps.append((order, [_prompt(g, 1, vocab) for _ in order]))
    # a new sequence takes the free slot while the others decode (mixed prefill + decode step)
    steps.append(([13, 20, 10, 11, 14], [_prompt(g, 1, vocab), _prompt(g, 33, vocab)] + [_prompt(g, 1, vocab)] * 3))
    for _ in range(3):
        steps.append(([20, 13, 11, 10, 14], [_prompt(g, 1, vocab) for _ in range(5)]))
    _assert_same(shard, steps, free_after={0: [12]})


def test_batched_decode_mixed_with_prompt_continuation(shard):
    """A step with decode rows plus a multi-token chunk appended after cached tokens (masked prefill path)."""
    g = torch.Generator().manual_seed(2)
    vocab = shard.cfg.vocab_size
    steps = [([0, 1, 2], [_prompt(g, n, vocab) for n in (50, 7, 16)])]
    steps.append(([0, 1, 2], [_prompt(g, 1, vocab), _prompt(g, 24, vocab), _prompt(g, 1, vocab)]))
    steps.append(([2, 1, 0], [_prompt(g, 1, vocab) for _ in range(3)]))
    _assert_same(shard, steps)


def test_batched_decode_all_logits_output(shard):
    g = torch.Generator().manual_seed(3)
    vocab = shard.cfg.vocab_size
    cache_ref, cache_new = shard.new_cache(256), shard.new_cache(256)
    prompts = [_prompt(g, n, vocab) for n in (3, 70, 18)]
    x = torch.tensor([t for p in prompts for t in p])
    counts = [len(p) for p in prompts]
    for cache in (cache_ref, cache_new):
        shard.forward(x, [0, 1, 2], counts, cache)
    step = torch.tensor(_prompt(g, 3, vocab))
    shard.batched_decode = False
    try:
        ref = shard.forward(step, [0, 1, 2], [1, 1, 1], cache_ref, output="all_logits")
    finally:
        shard.batched_decode = True
    new = shard.forward(step, [0, 1, 2], [1, 1, 1], cache_new, output="all_logits")
    assert float((ref - new).abs().max()) <= 1e-5
