"""Sharded == unsharded: pipeline stages, uneven tensor-parallel splits and both combined, driven in one process
(tp_local: threads + barrier all-reduce), over a KV-cached ragged batch (prefill, chunked prefill, decode).

Relative error = max|sharded - unsharded| / max|unsharded| per step; the bound is 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from ollama_distributed.model.config import ModelConfig
from ollama_distributed.model.shard import ShardSpec
from ollama_distributed.model.tp_local import LocalPipeline, LocalStage, make_plan, split_evenly
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.model.weights import load_weights, read_config

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# (seq_ids, token counts, output) per step: ragged prefill, chunk after cached prefix + decode mixed, a new
# sequence joining, batched decode in a different order, and a freed id coming back.
SCENARIO = [
    ([0, 1, 2], [7, 12, 3], "logits"),
    ([0, 1, 2], [4, 1, 2], "all_logits"),
    ([3], [5], "logits"),
    ([2, 0, 3, 1], [1, 1, 1, 1], "logits"),
    ([1, 0], [1, 1], "logits"),
    ("free", [1], None),
    ([1, 2], [6, 1], "all_logits"),
    ([0, 1, 2, 3], [1, 1, 1, 1], "hidden"),
]


def run_scenario(forward, caches_free, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    outs = []
    for seq_ids, counts, output in SCENARIO:
        if seq_ids == "free":
            caches_free(counts[0])
            continue
        x = torch.randint(0, vocab, (sum(counts),), generator=g)
        outs.append(forward(x, seq_ids, counts, output))
    return outs


def reference_outputs(shard: ModelShard) -> list[torch.Tensor]:
    cache = shard.new_cache(128)
    return run_scenario(lambda x, s, c, o: shard.forward(x, s, c, cache, output=o), cache.free, shard.cfg.vocab_size)


def pipeline_outputs(pipe: LocalPipeline, vocab: int) -> list[torch.Tensor]:
    caches = pipe.new_cache(128)

    def free(seq_id: int) -> None:
        for stage in caches:
            for c in stage:
                c.free(seq_id)

    return run_scenario(lambda x, s, c, o: pipe.forward(x, s, c, caches, output=o), free, vocab)


def plans(cfg: ModelConfig) -> dict[str, list[list[ShardSpec]]]:
    """The splits of issue 2, expressed for any model with 3 KV-head groups."""
    L, F = cfg.n_layers, cfg.ffn_size
    assert cfg.n_kv_heads == 3, "splits below assume 3 KV groups (SmolLM2 and the tiny fixture)"
    third = L // 3
    return {
        "pp2": make_plan(cfg, [(0, L // 2), (L // 2, L)]),
        "pp3-uneven": make_plan(cfg, [(0, third - 1), (third - 1, 2 * third + 1), (2 * third + 1, L)]),
        "pp2-empty-last": make_plan(cfg, [(0, L), (L, L)]),
        # 2-way uneven: KV groups 2 + 1, FFN split off any 32-column block boundary
        "tp2-uneven": make_plan(cfg, [(0, L)], [(0, 2), (2, 3)], [(0, F * 5 // 8 + 3), (F * 5 // 8 + 3, F)]),
        # 3-way: one KV group each, FFN weighted 2:1:1 (1536 → 768, 384, 384 for SmolLM2)
        "tp3-211": make_plan(cfg, [(0, L)], [(0, 1), (1, 2), (2, 3)], split_evenly(F, [2, 1, 1])),
        "pp2xtp2": make_plan(cfg, [(0, L // 2 - 1), (L // 2 - 1, L)], [(0, 1), (1, 3)], [(0, F // 3), (F // 3, F)]),
    }


def slice_weights(full: dict[str, torch.Tensor], cfg: ModelConfig, spec: ShardSpec) -> dict[str, torch.Tensor]:
    """What a shard owns, cut from full-model weights in memory (Megatron column/row splits)."""
    hd = cfg.head_dim
    (h0, h1), (k0, k1), (f0, f1) = spec.heads(cfg), spec.kv_heads, spec.ffn
    out = {}
    if spec.has_embedding:
        out["embed"] = full["embed"]
    if spec.has_output:
        out["norm"], out["lm_head"] = full["norm"], full["lm_head"]
    for i in range(*spec.layers):
        n = f"layers.{i}."
        out[n + "attn_norm"], out[n + "ffn_norm"] = full[n + "attn_norm"], full[n + "ffn_norm"]
        out[n + "q"] = full[n + "q"][h0 * hd : h1 * hd]
        out[n + "k"] = full[n + "k"][k0 * hd : k1 * hd]
        out[n + "v"] = full[n + "v"][k0 * hd : k1 * hd]
        for b, (s, e) in (("q_bias", (h0, h1)), ("k_bias", (k0, k1)), ("v_bias", (k0, k1))):
            if n + b in full:
                out[n + b] = full[n + b][s * hd : e * hd]
        out[n + "o"] = full[n + "o"][:, h0 * hd : h1 * hd]
        out[n + "gate"], out[n + "up"] = full[n + "gate"][f0:f1], full[n + "up"][f0:f1]
        out[n + "down"] = full[n + "down"][:, f0:f1]
    return out


def check_plan(plan, make_shard, reference: list[torch.Tensor], vocab: int, tol: float = TOL) -> None:
    """The scenario through LocalPipeline of make_shard(spec) for the plan's specs (plan[stage][rank]) equals
    `reference` step by step (the unsharded engine's `reference_outputs`)."""
    pipe = LocalPipeline([LocalStage([make_shard(spec) for spec in stage]) for stage in plan])
    try:
        got = pipeline_outputs(pipe, vocab)
    finally:
        pipe.close()
    assert len(got) == len(reference)
    for step, (a, b) in enumerate(zip(got, reference)):
        assert a.shape == b.shape, f"step {step}"
        assert rel_err(a, b) <= tol, f"step {step}: rel err {rel_err(a, b):.2e}"


# --- tiny model: every shard loaded from the file (partial loading path) -----------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tiny_gguf, tiny_gguf_factory):
    path = tiny_gguf if request.param == "llama" else tiny_gguf_factory(arch="qwen2", vocab=1024, n_layers=6)
    shard = ModelShard.from_file(path)
    return path, shard.cfg, reference_outputs(shard)


@pytest.mark.parametrize("name", ["pp2", "pp3-uneven", "pp2-empty-last", "tp2-uneven", "tp3-211", "pp2xtp2"])
def test_tiny_sharded_equals_unsharded(tiny, name):
    path, cfg, reference = tiny
    check_plan(plans(cfg)[name], lambda spec: ModelShard(cfg, spec, load_weights(path, cfg, spec)), reference, cfg.vocab_size)


# --- SmolLM2: splits of the real model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    cfg = read_config(smollm2_path)
    full = load_weights(smollm2_path, cfg, ShardSpec.full(cfg))
    # ModelShard consumes the dict it is given: hand it a shallow copy, keep `full` for slicing
    return smollm2_path, cfg, full, reference_outputs(ModelShard(cfg, ShardSpec.full(cfg), dict(full)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pp2", "pp3-uneven", "tp2-uneven", "tp3-211", "pp2xtp2"])
def test_smollm2_sharded_equals_unsharded(smollm2, name):
    path, cfg, full, reference = smollm2
    if name == "tp3-211":
        assert [e - s for s, e in split_evenly(cfg.ffn_size, [2, 1, 1])] == [768, 384, 384]
    if name == "pp2xtp2":  # the combined split loads every shard from the file, like a real worker
        make = lambda spec: ModelShard(cfg, spec, load_weights(path, cfg, spec))  # noqa: E731
    else:
        make = lambda spec: ModelShard(cfg, spec, slice_weights(full, cfg, spec))  # noqa: E731
    check_plan(plans(cfg)[name], make, reference, cfg.vocab_size)


def test_split_evenly():
    assert split_evenly(1536, [2, 1, 1]) == [(0, 768), (768, 1152), (1152, 1536)]
    assert split_evenly(10, [1, 1, 1]) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(3, [1, 1]) == [(0, 2), (2, 3)]
