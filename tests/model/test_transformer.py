"""ModelShard vs transformers on the same GGUF: logits (fp32) and greedy continuations.

Relative error is defined as max|ours - ref| / max|ref| over all compared logits (one number per prompt).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from ollama_distributed.model.errors import ContextLengthError
from ollama_distributed.model.transformer import ModelShard

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Why is the sky blue? Explain it to a child in two sentences.",
    "1, 2, 3, 5, 8, 13,",
    "Über den Wolken — 雲の上で",
]
GREEDY_TOKENS = 64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def hf_load(path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' own KV-cached greedy loop (no generate(): its eos/min-length handling would alter logits)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def ours_prefill_all(shard: ModelShard, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts in ONE ragged forward; per-prompt (len, vocab) logits."""
    cache = shard.new_cache(512)
    flat = torch.tensor([t for p in prompts for t in p])
    logits = shard.forward(flat, list(range(len(prompts))), [len(p) for p in prompts], cache, output="all_logits")
    return list(logits.split([len(p) for p in prompts]))


def ours_greedy_batched(shard: ModelShard, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuation of several prompts decoded together as one batch (different lengths)."""
    cache = shard.new_cache(512)
    ids = list(range(len(prompts)))
    flat = torch.tensor([t for p in prompts for t in p])
    logits = shard.forward(flat, ids, [len(p) for p in prompts], cache)
    out = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(n - 1):
        logits = shard.forward(torch.tensor([o[-1] for o in out]), ids, [1] * len(ids), cache)
        for o, t in zip(out, logits.argmax(-1)):
            o.append(int(t))
    return out


# --- SmolLM2-135M (real weights) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """(our fp32 shard, transformers fp32 model, tokenised prompts) loaded once for the module (~20 s)."""
    tok = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return ModelShard.from_file(smollm2_path), hf_load(smollm2_path), prompts


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    ours, ref, prompts = smollm2
    assert len({len(p) for p in prompts}) > 1, "prompts should have different lengths (ragged batch)"
    for prompt, got in zip(prompts, ours_prefill_all(ours, prompts)):
        assert rel_err(got, hf_logits(ref, prompt)) <= 1e-4


@pytest.mark.slow
def test_smollm2_greedy_64_tokens_identical(smollm2):
    ours, ref, prompts = smollm2
    chosen = prompts[:3]
    got = ours_greedy_batched(ours, chosen, GREEDY_TOKENS)
    for prompt, tokens in zip(chosen, got):
        assert tokens == hf_greedy(ref, prompt, GREEDY_TOKENS)


# --- tiny random GGUFs (every supported layout / dtype) ----------------------------------------------------

TINY_VARIANTS = {
    "llama-f32": {},
    "llama-tied": {"tied": True, "vocab": 1024},
    "qwen2-bias": {"arch": "qwen2", "vocab": 1024},
    "llama-f16": {"dtype": "f16", "vocab": 1024},
    "llama-bf16": {"dtype": "bf16", "vocab": 1024},
    "llama-q8_0": {"dtype": "q8_0", "vocab": 1024},
    "llama-q4_0": {"dtype": "q4_0", "vocab": 1024},
    "llama-q4_1": {"dtype": "q4_1", "vocab": 1024},
    "llama-q4_k": {"dtype": "q4_k", "vocab": 1024, "hidden": 256, "n_heads": 8, "n_kv_heads": 2, "ffn": 512},
    "llama-q5_k": {"dtype": "q5_k", "vocab": 1024, "hidden": 256, "n_heads": 8, "n_kv_heads": 2, "ffn": 512},
    "llama-q6_k": {"dtype": "q6_k", "vocab": 1024, "hidden": 256, "n_heads": 8, "n_kv_heads": 2, "ffn": 512},
    "llama-headdim": {"vocab": 1024, "hidden": 64, "n_heads": 4, "n_kv_heads": 1, "head_dim": 32},
}
# Greedy decoding (64 tokens, batched) is checked on one model per code path; logits on all of them.
GREEDY_VARIANTS = ("llama-f32", "qwen2-bias", "llama-q4_k")


def tiny_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 9, 23, 4)]


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_logits_and_greedy_match_transformers(tiny_gguf, tiny_gguf_factory, variant):
    path = tiny_gguf if variant == "llama-f32" else tiny_gguf_factory(**TINY_VARIANTS[variant])
    ours, ref = ModelShard.from_file(path), hf_load(path)
    prompts = tiny_prompts(ours.cfg.vocab_size)
    for prompt, got in zip(prompts, ours_prefill_all(ours, prompts)):
        assert rel_err(got, hf_logits(ref, prompt)) <= 1e-4
    if variant in GREEDY_VARIANTS:
        for prompt, tokens in zip(prompts, ours_greedy_batched(ours, prompts, GREEDY_TOKENS)):
            assert tokens == hf_greedy(ref, prompt, GREEDY_TOKENS)


def _hf_with_rope(path, rope_parameters: dict) -> torch.nn.Module:
    """transformers' GGUF loader ignores llama rope-scaling keys, so rebuild its model with the scaling set."""
    base = hf_load(path)
    config = base.config
    config.rope_parameters = {**rope_parameters, "rope_theta": 10000.0}
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(base.state_dict())
    return model


def test_linear_rope_scaling_matches_transformers(tiny_gguf_factory):
    path = tiny_gguf_factory(vocab=1024, rope_scaling={"type": "linear", "factor": 4.0})
    ours = ModelShard.from_file(path)
    assert ours.cfg.rope_scaling.kind == "linear" and ours.cfg.rope_scaling.factor == 4.0
    ref = _hf_with_rope(path, {"rope_type": "linear", "factor": 4.0})
    prompt = tiny_prompts(1024, seed=3)[2] * 8  # 184 tokens: positions where the scaling matters
    (got,) = ours_prefill_all(ours, [prompt])
    assert rel_err(got, hf_logits(ref, prompt)) <= 1e-4


def test_llama3_rope_freqs_tensor_matches_transformers(tiny_gguf_factory, tmp_path):
    """Llama-3.1 GGUFs carry RoPE scaling as a `rope_freqs.weight` tensor of per-frequency divisors."""
    from tests.model.gguf_edit import rewrite_gguf

    from ollama_distributed.model import rope
    from ollama_distributed.model.config import RopeScaling

    src = tiny_gguf_factory(vocab=1024)
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    # Divisors as llama.cpp's converter derives them: base inv_freq / llama3-scaled inv_freq.
    cfg0 = ModelShard.from_file(src).cfg
    scaled = rope.inv_freq(type(cfg0)(**{**cfg0.__dict__, "rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, 64)}))
    divisors = (rope.inv_freq(cfg0) / scaled).numpy()
    path = rewrite_gguf(src, tmp_path / "llama31.gguf", extra_tensors={"rope_freqs.weight": divisors})
    ours = ModelShard.from_file(path)
    assert ours.cfg.rope_scaling.kind == "llama3"
    ref = _hf_with_rope(src, params)
    prompt = tiny_prompts(1024, seed=4)[2] * 6
    (got,) = ours_prefill_all(ours, [prompt])
    assert rel_err(got, hf_logits(ref, prompt)) <= 1e-4


# --- engine behaviour ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_shard(tiny_gguf) -> ModelShard:
    return ModelShard.from_file(tiny_gguf)


def test_cache_grows_frees_and_reuses_slots(tiny_shard):
    prompts = tiny_prompts(tiny_shard.cfg.vocab_size, seed=7)
    long = (prompts[2] * 14)[:300]  # past the initial capacity of 256 positions
    (want,) = ours_prefill_all(tiny_shard, [long])
    cache = tiny_shard.new_cache(1000)
    for sid in range(6):  # more sequences than the initial 4 slots
        tiny_shard.forward(torch.tensor(prompts[1]), [sid], [len(prompts[1])], cache)
    cache.free(3)
    cache.free(5)
    assert cache.length(3) == 0 and cache.length(0) == len(prompts[1])
    got = []
    for start in range(0, 300, 100):  # chunked prefill of a reused id, growing the capacity on the way
        chunk = long[start : start + 100]
        got.append(tiny_shard.forward(torch.tensor(chunk), [3], [len(chunk)], cache, output="all_logits"))
    assert cache.capacity >= 300 and cache.length(3) == 300
    assert rel_err(torch.cat(got), want) <= 1e-5


def test_context_overflow_is_a_typed_error_and_leaves_cache_intact(tiny_shard):
    cache = tiny_shard.new_cache(16)
    tiny_shard.forward(torch.arange(10), [0], [10], cache)
    with pytest.raises(ContextLengthError, match="10 cached \\+ 7 new tokens exceeds the context length 16"):
        tiny_shard.forward(torch.arange(7), [0], [7], cache)
    assert cache.length(0) == 10


@pytest.mark.parametrize(
    "x, seq_ids, counts, match",
    [
        (torch.arange(3), [0, 1], [3], "one token count per sequence"),
        (torch.arange(3), [0, 0], [1, 2], "duplicate seq_ids"),
        (torch.arange(3), [0], [2], "int64 token ids of shape \\(2,\\)"),
        (torch.tensor([1, 10**6]), [0], [2], "token id out of range"),
        (torch.arange(3), [0, 1], [3, 0], "at least one new token"),
    ],
)
def test_bad_forward_inputs_raise_value_error(tiny_shard, x, seq_ids, counts, match):
    with pytest.raises(ValueError, match=match):
        tiny_shard.forward(x, seq_ids, counts, tiny_shard.new_cache(64))


def test_output_modes_agree(tiny_shard):
    prompts = tiny_prompts(tiny_shard.cfg.vocab_size, seed=9)
    counts = [len(p) for p in prompts]
    flat = torch.tensor([t for p in prompts for t in p])
    ids = list(range(len(prompts)))
    all_logits = tiny_shard.forward(flat, ids, counts, tiny_shard.new_cache(64), output="all_logits")
    last = tiny_shard.forward(flat, ids, counts, tiny_shard.new_cache(64), output="logits")
    hidden = tiny_shard.forward(flat, ids, counts, tiny_shard.new_cache(64), output="hidden")
    ends = torch.tensor(counts).cumsum(0) - 1
    assert rel_err(last, all_logits[ends]) <= 1e-6
    assert hidden.shape == (sum(counts), tiny_shard.cfg.hidden_size)
    assert rel_err(hidden @ tiny_shard.lm_head.T, all_logits) <= 1e-6


def test_bf16_and_fp16_track_fp32(tiny_gguf):
    prompts = tiny_prompts(49152, seed=11)
    want = ours_prefill_all(ModelShard.from_file(tiny_gguf), prompts)
    for dtype in (torch.bfloat16, torch.float16):
        low = ModelShard.from_file(tiny_gguf, dtype=dtype)
        assert low.layers[0].wqkv.dtype == dtype
        for got, ref in zip(ours_prefill_all(low, prompts), want):
            assert got.dtype == torch.float32
            assert rel_err(got, ref) <= 5e-2
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
            assert agree >= 0.9
