"""LocalExecutor on the real tiny GGUF: step semantics, cache bookkeeping, embeddings, in-process sharding."""

from __future__ import annotations

import pytest
import torch

from ollama_distributed.model.tp_local import make_plan
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.runtime.executor import CacheFullError, Executor
from ollama_distributed.runtime.local_executor import LocalExecutor

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [300, 301, 302], [9000, 17, 42, 42, 42, 5, 6]]


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    return ModelShard.from_file(tiny_gguf)


def _full_logits(shard: ModelShard, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) logits of one uncached forward over the whole sequence."""
    cache = shard.new_cache(len(ids))
    return shard.forward(torch.tensor(ids), [0], [len(ids)], cache, output="all_logits")


def test_satisfies_protocol(tiny_gguf):
    ex = LocalExecutor(tiny_gguf, max_seq_len=64)
    assert isinstance(ex, Executor)
    assert ex.max_seq_len == 64 and ex.config.n_layers == 4
    ex.close()
    with pytest.raises(RuntimeError, match="closed"):
        ex.step([1], [[1]])


def test_chunked_ragged_steps_equal_full_forward(tiny_gguf, reference):
    ex = LocalExecutor(tiny_gguf, max_seq_len=128)
    full = [_full_logits(reference, p) for p in PROMPTS]
    # seq 0 in chunks 4+4+3, seq 1 whole, seq 2 one token at a time, all mixed in the same steps
    plan = [
        ([0, 1, 2], [PROMPTS[0][:4], PROMPTS[1], PROMPTS[2][:1]]),
        ([2, 0], [PROMPTS[2][1:2], PROMPTS[0][4:8]]),
        ([0, 2], [PROMPTS[0][8:], PROMPTS[2][2:3]]),
    ]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    for ids, toks in plan:
        out = ex.step(ids, toks)
        assert out.shape == (len(ids), ex.config.vocab_size) and out.dtype == torch.float32
        for row, sid in enumerate(ids):
            got[sid].append(out[row])
    assert torch.allclose(got[0][-1], full[0][-1], atol=1e-5, rtol=1e-5)
    assert torch.allclose(got[0][0], full[0][3], atol=1e-5, rtol=1e-5)
    assert torch.allclose(got[1][0], full[1][-1], atol=1e-5, rtol=1e-5)
    for k in range(3):
        assert torch.allclose(got[2][k], full[2][k], atol=1e-5, rtol=1e-5)
    assert ex.cached_length(0) == 11 and ex.cached_length(2) == 3
    assert ex.cached_sequences() == {0, 1, 2}


def test_free_drops_cache_and_id_restarts(tiny_gguf, reference):
    ex = LocalExecutor(tiny_gguf, max_seq_len=64)
    ex.step([7, 8], [PROMPTS[1], PROMPTS[2]])
    ex.free(7)
    assert ex.cached_sequences() == {8} and ex.cached_length(7) == 0
    ex.free(12345)  # unknown ids are ignored
    # a freed id starts from position 0 again (replay after failure relies on this)
    out = ex.step([7], [PROMPTS[0]])
    assert torch.allclose(out[0], _full_logits(reference, PROMPTS[0])[-1], atol=1e-5, rtol=1e-5)


def test_cache_full_is_typed_and_leaves_state(tiny_gguf):
    ex = LocalExecutor(tiny_gguf, max_seq_len=8)
    ex.step([1], [[5] * 6])
    with pytest.raises(CacheFullError, match="max_seq_len 8"):
        ex.step([1], [[5] * 3])
    assert ex.cached_length(1) == 6
    ex.step([1], [[5, 5]])  # exactly full is fine
    assert ex.cached_length(1) == 8


def test_embed_is_mean_of_final_hidden(tiny_gguf, reference):
    ex = LocalExecutor(tiny_gguf, max_seq_len=64)
    ex.step([3], [PROMPTS[1]])
    ids = PROMPTS[0]
    hidden = reference.forward(torch.tensor(ids), [0], [len(ids)], reference.new_cache(len(ids)), output="hidden")
    vec = ex.embed(ids)
    assert vec.shape == (ex.config.hidden_size,)
    assert torch.allclose(vec, hidden.mean(0), atol=1e-5)
    assert ex.cached_sequences() == {3}  # embeddings use no persistent cache


def test_in_process_pipeline_and_tensor_parallel_equal_unsharded(tiny_gguf, reference):
    """2 stages (uneven 1+3 layers) × 2 TP shards (uneven 2+1 KV heads, FFN 80+48) == the whole model."""
    cfg = reference.cfg
    plan = make_plan(cfg, [(0, 1), (1, 4)], kv_ranges=[(0, 2), (2, 3)], ffn_ranges=[(0, 80), (80, cfg.ffn_size)])
    ex = LocalExecutor.from_plan(tiny_gguf, plan, max_seq_len=64)
    out = ex.step([0, 1], [PROMPTS[0], PROMPTS[2]])
    out2 = ex.step([0], [[77]])
    ref0 = _full_logits(reference, PROMPTS[0] + [77])
    assert torch.allclose(out[0], ref0[-2], atol=1e-5, rtol=1e-5)
    assert torch.allclose(out2[0], ref0[-1], atol=1e-5, rtol=1e-5)
    assert torch.allclose(out[1], _full_logits(reference, PROMPTS[2])[-1], atol=1e-5, rtol=1e-5)
    assert ex.cached_sequences() == {0, 1}
    ex.free(0)
    assert ex.cached_sequences() == {1}
    ex.close()
