"""Qwen3-MoE and Qwen2-MoE from HF directories (config.json + safetensors): transformers' own models of a tiny random
config, saved with save_pretrained (each expert's matrices apart, as Hub checkpoints store them), against our engine
loading that directory; and the expert-parallel / pipeline splits of tests/model/test_moe.py on it.

Relative error = max|ours - ref| / max|ref| (tests/model/test_transformer.py).
"""

from __future__ import annotations

import pytest
import torch

from ollama_distributed.model.errors import ModelFileError
from ollama_distributed.model.hf import read_hf_config
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.model.weights import load_weights, read_config
from tests.model.test_moe import PLANS
from tests.model.test_sharded import check_plan, reference_outputs
from tests.model.test_transformer import (hf_greedy, hf_logits, ours_greedy_batched, ours_prefill_all, rel_err,
                                          tiny_prompts)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
GREEDY = 32
# test_moe.py's shapes (its PLANS assume them): 3 layers, hidden 64, 4 q / 2 kv heads of 32, 8 experts of FFN 64, top-3
SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=3,
             max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of the scale tests/helpers/tiny_gguf.py uses (N(0, 1) embedding rows, N(0, 0.08²) projections,
    norms ~1, a router of O(1) spread), so logits and routing vary from token to token; transformers' own init
    (std 0.02) gives near-uniform logits whose greedy picks would hang on float noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                std = 0.15 if name.endswith("mlp.gate.weight") or "shared_expert_gate" in name else 0.08
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def hf_moe_dir(tmp_path_factory):
    """`make(kind) -> (directory, transformers model)` for kind "qwen3_moe" (norm_topk_prob true, as Qwen3-30B-A3B)
    or "qwen2_moe" (q/k/v biases, top-k weights as they are, a shared expert of 96 columns with its gate)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    cache = {}

    def make(kind: str):
        if kind not in cache:
            if kind == "qwen3_moe":
                model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPE, norm_topk_prob=True))
            else:
                model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**SHAPE, shared_expert_intermediate_size=96))
            _randomise(model, seed=3)
            d = tmp_path_factory.mktemp(kind) / "hf"
            model.save_pretrained(d)
            cache[kind] = (d, model)
        return cache[kind]

    return make


@pytest.mark.parametrize("kind, arch, shared, norm_topk, bias",
                         [("qwen3_moe", "qwen3moe", 0, True, False), ("qwen2_moe", "qwen2moe", 96, False, True)])
def test_config(hf_moe_dir, kind, arch, shared, norm_topk, bias):
    cfg = read_config(hf_moe_dir(kind)[0])
    assert (cfg.arch, cfg.n_expert, cfg.n_expert_used, cfg.ffn_size, cfg.head_dim) == (arch, 8, 3, 64, 32)
    assert (cfg.shared_expert_ffn, cfg.norm_topk_prob, cfg.attention_bias) == (shared, norm_topk, bias)
    assert cfg.qk_norm == (kind == "qwen3_moe")


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_logits_and_greedy_match_transformers(hf_moe_dir, kind):
    d, ref = hf_moe_dir(kind)
    ours = ModelShard.from_file(d)
    prompts = tiny_prompts(ours.cfg.vocab_size)
    for prompt, got in zip(prompts, ours_prefill_all(ours, prompts)):
        assert rel_err(got, hf_logits(ref, prompt)) <= 1e-4
    for prompt, tokens in zip(prompts, ours_greedy_batched(ours, prompts, GREEDY)):
        assert tokens == hf_greedy(ref, prompt, GREEDY)


@pytest.mark.parametrize("plan", list(PLANS))
def test_sharded_equals_unsharded(hf_moe_dir, plan):
    d, _ = hf_moe_dir("qwen3_moe")
    check_plan(PLANS[plan], lambda s: ModelShard.from_file(d, s), reference_outputs(ModelShard.from_file(d)),
               read_config(d).vocab_size)


def test_shared_expert_split_and_reads_only_its_experts(hf_moe_dir):
    """qwen2_moe under uneven expert parallelism equals the unsharded engine (the shared expert on the rank whose
    experts start at 0 only), and a rank's tensors are only its experts'."""
    d, _ = hf_moe_dir("qwen2_moe")
    cfg = read_config(d)
    stage = PLANS["ep2-uneven"][0]
    names = [set(load_weights(d, cfg, s)) for s in stage]
    assert {int(n.split(".")[3]) for n in names[1] if ".experts." in n} == {3, 4, 5, 6, 7}
    assert ["layers.0.shared.gate" in n for n in names] == [True, False]
    check_plan([stage], lambda s: ModelShard.from_file(d, s), reference_outputs(ModelShard.from_file(d)), cfg.vocab_size)


@pytest.mark.parametrize("quant, bound", [("native", 1e-3), ("int4", 0.35)])
def test_other_weight_formats(hf_moe_dir, quant, bound):
    """--dtype auto (an HF directory's float tensors as they are, with the format's float16 KV cache) and int4 (the
    experts as 4-bit groups: off by what tests/model/test_families.py allows a tiny model) vs the float32 engine."""
    d, _ = hf_moe_dir("qwen3_moe")
    exact, other = ModelShard.from_file(d), ModelShard.from_file(d, quant=quant)
    prompts = tiny_prompts(exact.cfg.vocab_size)
    for a, b in zip(ours_prefill_all(other, prompts), ours_prefill_all(exact, prompts)):
        assert rel_err(a, b) <= bound


def test_dense_layers_are_refused(hf_moe_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(hf_moe_dir("qwen3_moe")[0], d)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "mlp_only_layers": [1]}))
    with pytest.raises(ModelFileError, match="mlp_only_layers"):
        read_hf_config(d)
