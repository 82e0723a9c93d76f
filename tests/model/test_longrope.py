"""Phi-3 LongRoPE (the 128k files): a tiny random phi3 GGUF with `rope_factors_long/short` tensors, as llama.cpp's
converter writes them, against two references.

- transformers' Phi3ForCausalLM with `rope_parameters={"rope_type": "longrope", ...}` holding the same weights (its
  GGUF loader ignores the factor tensors, so the model it loads only lends its weights). transformers picks the
  factors by the current length (`longrope_frequency_update`), we by the cache's capacity as llama.cpp does; the
  two agree when a sequence stays on one side of the original context: prompts shorter than it with a cache no
  larger (short factors), and a prompt longer than it with a larger cache (long factors).
- llama.cpp (llama-cpp-python), which decides by its context size (`n_ctx_per_seq > n_ctx_orig_yarn`,
  llama-model.cpp `get_rope_factors`): its logits at n_ctx 256 (short) and 512 (long) are held below as literals,
  so CI, which does not install llama-cpp-python, checks them too; `test_held_values_are_llama_cpps` recomputes
  them where it is installed (one token per batch: llama-cpp-python crashes on multi-token batches on AMX CPUs).

The file's original context is 256 because llama.cpp pads n_ctx to a multiple of 256, so a smaller one could not
select the short factors there.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from ollama_distributed.model import rope
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.model.weights import load_weights, read_config
from tests.helpers.tiny_gguf import write_tiny_family_gguf
from tests.model.test_sharded import check_plan, plans, reference_outputs
from tests.model.test_transformer import hf_greedy, hf_logits, rel_err

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ORIG, CONTEXT, HEAD_DIM = 256, 1024, 32  # head_dim 32: our fused RoPE + cache kernels take these shapes
_g = np.random.default_rng(3)
# Factors of the magnitudes Phi-3-mini-128k carries (long: 1 … ~40 rising with the wavelength; short: ~1 … 3)
LONG = np.round(np.sort(1.0 + _g.uniform(0, 40, HEAD_DIM // 2)), 3).tolist()
SHORT = np.round(np.sort(1.0 + _g.uniform(0, 2, HEAD_DIM // 2)), 3).tolist()
PROMPT = torch.Generator().manual_seed(11)

# llama.cpp's logits for the last of LLAMA_PROMPT's tokens: (n_ctx, top-8 token ids, their logits)
LLAMA_PROMPT = torch.randint(0, 1024, (20,), generator=torch.Generator().manual_seed(5)).tolist()
# (with an f32 KV cache, as ours; llama-cpp-python 0.3.36, measured 1e-6 from ours on the whole vocabulary)
HELD = {
    256: ([431, 929, 330, 971, 819, 407, 780, 853],
          [8.382998, 8.007708, 7.194493, 7.10832, 6.874565, 6.768343, 6.588681, 6.506512]),
    512: ([431, 403, 563, 950, 936, 578, 971, 603],
          [8.492786, 8.442107, 7.012422, 6.862508, 6.735709, 6.574482, 6.505592, 6.485212]),
}


def write(path, orig: int = ORIG, dtype: str = "f32"):
    return write_tiny_family_gguf(path, "phi3", hidden=192, n_heads=6, n_kv_heads=3, n_layers=4, dtype=dtype,
                                  context_length=CONTEXT, name="tiny-random-longrope",  # (a name without "phi3":
                                  # llama.cpp's vocab loader then looks for Phi-3's own special tokens)
                                  longrope={"long_factor": LONG, "short_factor": SHORT,
                                            "original_context_length": orig})


@pytest.fixture(scope="module")
def longrope_gguf(tmp_path_factory):
    return write(tmp_path_factory.mktemp("longrope") / "phi3.gguf")


@pytest.fixture(scope="module")
def hf_longrope(longrope_gguf):
    return hf_model(longrope_gguf)


def hf_model(path):
    """transformers' Phi3 with LongRoPE configured, holding the weights its GGUF loader reads from the file."""
    from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    c = plain.config.to_dict()
    for key in ("rope_parameters", "rope_scaling", "quantization_config", "original_max_position_embeddings",
                "max_position_embeddings"):
        c.pop(key, None)
    config = Phi3Config(**c, max_position_embeddings=CONTEXT, original_max_position_embeddings=ORIG,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": LONG,
                                         "short_factor": SHORT, "original_max_position_embeddings": ORIG})
    model = Phi3ForCausalLM(config)
    model.load_state_dict(plain.state_dict())
    return model.eval()


def test_config_reads_the_factors(longrope_gguf):
    rs = read_config(longrope_gguf).rope_scaling
    assert rs.kind == "longrope" and (rs.original_context_length, rs.factor) == (ORIG, CONTEXT / ORIG)
    assert rs.long_factor == pytest.approx(LONG) and rs.short_factor == pytest.approx(SHORT)
    # convert_hf_to_gguf.py's attn_factor for s = 1024 / 256: sqrt(1 + ln 4 / ln 256) = sqrt(1.25)
    assert rs.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(256)), rel=1e-6)
    cfg = read_config(longrope_gguf)
    assert [rope.uses_long_factors(cfg, n) for n in (128, 256, 257, 1024)] == [False, False, True, True]


def _ours(shard: ModelShard, ids: list[int], capacity: int) -> torch.Tensor:
    return shard.forward(torch.tensor(ids), [0], [len(ids)], shard.new_cache(capacity), output="all_logits")


def _ours_greedy(shard: ModelShard, ids: list[int], capacity: int, n: int) -> list[int]:
    """Prompt, then n - 1 one-token decode steps (the fused RoPE + cache kernels' path for float32)."""
    cache = shard.new_cache(capacity)
    out = [int(shard.forward(torch.tensor(ids), [0], [len(ids)], cache).argmax())]
    for _ in range(n - 1):
        out.append(int(shard.forward(torch.tensor([out[-1]]), [0], [1], cache).argmax()))
    return out


def test_short_factors_match_transformers(longrope_gguf, hf_longrope):
    """Prompts within the original context, cache no larger: short factors on both sides."""
    ours = ModelShard.from_file(longrope_gguf)
    for n in (1, 7, 40):
        ids = torch.randint(0, 1024, (n,), generator=PROMPT).tolist()
        assert rel_err(_ours(ours, ids, ORIG), hf_logits(hf_longrope, ids)) <= 1e-4
    ids = torch.randint(0, 1024, (24,), generator=PROMPT).tolist()
    assert _ours_greedy(ours, ids, ORIG, 32) == hf_greedy(hf_longrope, ids, 32)


def test_long_factors_match_transformers(longrope_gguf, hf_longrope):
    """A prompt past the original context (transformers switches to the long factors for the whole forward) and a
    cache past it (ours uses them from the first token): every position's logits, and 32 greedy tokens."""
    ours = ModelShard.from_file(longrope_gguf)
    ids = torch.randint(0, 1024, (ORIG + 40,), generator=PROMPT).tolist()
    assert rel_err(_ours(ours, ids, CONTEXT), hf_logits(hf_longrope, ids)) <= 1e-4
    assert _ours_greedy(ours, ids, CONTEXT, 32) == hf_greedy(hf_longrope, ids, 32)
    # and the tables differ where it shows: the short one (a cache of the original context) is far off
    assert rel_err(_ours(ours, ids[:ORIG], ORIG), hf_logits(hf_longrope, ids)[:ORIG]) > 1e-2


def test_native_q8_0_with_long_factors(tmp_path):
    """`--dtype auto` on a Q8_0 file (the file's blocks through our kernels; one-token steps through the fused
    decode kernels where they apply): the prompt past the original context and 16 decode steps after it vs
    transformers' dequantised float32 (the native bound of tests/model/test_families.py), float32 KV cache."""
    path = write(tmp_path / "phi3.gguf", dtype="q8_0")
    ref, ours = hf_model(path), ModelShard.from_file(path, quant="native", kv_dtype=torch.float32)
    ids = torch.randint(0, 1024, (ORIG + 24,), generator=PROMPT).tolist()
    want = hf_logits(ref, ids)
    cache = ours.new_cache(CONTEXT)
    n = ORIG + 8
    got = [ours.forward(torch.tensor(ids[:n]), [0], [n], cache, output="all_logits")]
    got += [ours.forward(torch.tensor([t]), [0], [1], cache, output="all_logits") for t in ids[n:]]
    assert rel_err(torch.cat(got), want) <= 1e-3


@pytest.mark.parametrize("n_ctx", sorted(HELD))
def test_matches_llama_cpps_held_logits(longrope_gguf, n_ctx):
    """llama.cpp's choice by context size: n_ctx 256 (= the original context) takes the short factors, 512 the
    long ones, for the same 20-token prompt."""
    ids, values = HELD[n_ctx]
    got = _ours(ModelShard.from_file(longrope_gguf), LLAMA_PROMPT, n_ctx)[-1]
    assert rel_err(got[ids], torch.tensor(values)) <= 1e-4


def test_held_values_are_llama_cpps(longrope_gguf):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (the held values are checked against our engine regardless)")
    from llama_cpp import Llama

    for n_ctx, (ids, values) in HELD.items():
        llm = Llama(str(longrope_gguf), n_ctx=n_ctx, n_batch=1, n_ubatch=1, logits_all=True, n_threads=1,
                    verbose=False, type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache (its default is f16)
        assert llm.n_ctx() == n_ctx
        llm.eval(LLAMA_PROMPT)
        last = torch.tensor(np.asarray(llm.scores[len(LLAMA_PROMPT) - 1]), dtype=torch.float32)
        top = last.topk(8)
        assert top.indices.tolist() == ids, (n_ctx, top.indices.tolist(), top.values.tolist())
        assert rel_err(top.values, torch.tensor(values)) <= 1e-5, (n_ctx, top.values.tolist())
        llm.close()


def test_sharded_equals_unsharded_with_long_factors(tmp_path):
    """PP x uneven TP of a file whose original context (64) is below test_sharded's cache (128): every shard
    rotates with the long factors and the attention factor, and the pieces equal the whole."""
    path = write(tmp_path / "phi3.gguf", orig=64)
    cfg = read_config(path)
    assert rope.uses_long_factors(cfg, 128)
    check_plan(plans(cfg)["pp2xtp2"], lambda spec: ModelShard(cfg, spec, load_weights(path, cfg, spec)),
               reference_outputs(ModelShard.from_file(path)), cfg.vocab_size)


def test_hf_directory_equals_gguf(longrope_gguf, hf_longrope, tmp_path):
    """transformers' save of the LongRoPE model (config.json's rope_parameters with the factor lists) reads to the
    GGUF's RoPE description, the attention factor derived as transformers derives it, and equal logits."""
    hf_longrope.save_pretrained(tmp_path / "hf")
    from_dir, from_gguf = ModelShard.from_file(tmp_path / "hf"), ModelShard.from_file(longrope_gguf)
    a, b = from_dir.cfg.rope_scaling, from_gguf.cfg.rope_scaling
    assert (a.kind, a.original_context_length, a.factor) == (b.kind, b.original_context_length, b.factor)
    assert a.long_factor == pytest.approx(b.long_factor) and a.short_factor == pytest.approx(b.short_factor)
    assert a.attention_factor == pytest.approx(b.attention_factor, rel=1e-6)
    ids = torch.randint(0, 1024, (ORIG + 8,), generator=PROMPT).tolist()
    for capacity in (ORIG, CONTEXT):
        assert rel_err(_ours(from_dir, ids[:ORIG], capacity), _ours(from_gguf, ids[:ORIG], capacity)) <= 1e-6


def test_phi3_128k_style_config_json(tmp_path):
    """Phi-3-mini-128k-instruct's own config.json shape (before transformers 5): `rope_scaling` {"type": "su" or
    "longrope", long/short factors} and the original context at the top level; a missing table is a clear error."""
    import json

    from ollama_distributed.model.errors import ModelFileError
    from ollama_distributed.model.hf import read_hf_config

    base = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "num_hidden_layers": 2, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 96, "vocab_size": 512,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0}
    for kind in ("su", "longrope"):
        d = tmp_path / kind
        d.mkdir()
        (d / "config.json").write_text(json.dumps(
            {**base, "rope_scaling": {"type": kind, "long_factor": [2.0] * 8, "short_factor": [1.0] * 8}}))
        rs = read_hf_config(d).rope_scaling
        assert (rs.kind, rs.factor, rs.original_context_length) == ("longrope", 32.0, 4096)
        # transformers' default attention factor: sqrt(1 + ln 32 / ln 4096) (Phi-3-mini-128k: 1.1902)
        assert rs.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**base, "rope_scaling": {"type": "longrope",
                                                                                        "long_factor": [2.0] * 8}}))
    with pytest.raises(ModelFileError, match="short_factor"):
        read_hf_config(tmp_path / "bad")
