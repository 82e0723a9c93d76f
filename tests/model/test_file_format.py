"""`--dtype auto`: every tensor kept in its file type (model/file_format.py, model/native.py), end to end.

Each GGUF type on a tiny random model vs transformers loading the same file (which dequantises it: the exact
weights), with our kernels and with the portable fallback; the memory a shard holds vs the file's bytes;
pipeline and tensor-parallel shards vs the unsharded engine.

Bounds: the weights are the file's exactly; what differs from transformers' float32 is the activations'
quantisation inside our kernels (two int8 levels per 32 inputs, ~15 bits: model/kernels) and, with the default
float16 KV cache, the cache's rounding (11 bits, as Ollama's default). So logits stay within 1e-3 relative with a
float32 cache and 5e-3 with float16, and greedy tokens (float32 cache) equal transformers'.
"""

from __future__ import annotations

import gguf
import pytest
import torch

from ollama_distributed.model import cpu_kernels
from ollama_distributed.model.file_format import GGUFRows
from ollama_distributed.model.shard import ShardSpec
from ollama_distributed.model.tp_local import LocalPipeline, LocalStage, make_plan
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.model.weights import load_weights, open_gguf, read_config
from tests.model.test_transformer import (
    hf_greedy,
    hf_load,
    hf_logits,
    ours_greedy_batched,
    ours_prefill_all,
    rel_err,
    tiny_prompts,
)

K_SHAPE = {"vocab": 1024, "hidden": 256, "n_heads": 8, "n_kv_heads": 2, "ffn": 512}  # rows of whole 256-blocks
VARIANTS = {
    "q4_0": {"vocab": 1024}, "q4_1": {"vocab": 1024}, "q5_0": {"vocab": 1024}, "q5_1": {"vocab": 1024},
    "q8_0": {"vocab": 1024}, "q4_k": K_SHAPE, "q5_k": K_SHAPE, "q6_k": K_SHAPE,
    "f16": {"vocab": 1024}, "bf16": {"vocab": 1024},
    "q2_k": K_SHAPE, "q3_k": K_SHAPE,  # no kernel: row chunks dequantised per call (native.GGUFBlocks)
}
# heads of a KV group span 4 × 64 = 256 inputs of attn_output, so a TP split by KV group stays on the K-quant grid
K_TP_SHAPE = {"vocab": 1024, "hidden": 512, "n_heads": 8, "n_kv_heads": 2, "ffn": 512}
GREEDY = 32


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(params=["kernels", "fallback"])
def backend(request, monkeypatch):
    """Our compiled kernels where this CPU has them, or the portable torch fallback, forced."""
    if request.param == "fallback":
        monkeypatch.setenv("OLLAMA_DISTRIBUTED_CPU_KERNELS", "0")
    elif not cpu_kernels.available():
        pytest.skip("no compiled kernels on this CPU")
    cpu_kernels.ops.cache_clear()
    if hasattr(cpu_kernels, "native_ops"):
        cpu_kernels.native_ops.cache_clear()
    yield request.param
    cpu_kernels.ops.cache_clear()
    if hasattr(cpu_kernels, "native_ops"):
        cpu_kernels.native_ops.cache_clear()


def tied(variant: str) -> dict:
    # tie the head to the embedding on two variants, so both paths (embedding blocks as the head) are covered
    return {"tied": True} if variant in ("q4_1", "q6_k") else {}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_type_matches_transformers(tiny_gguf_factory, backend, variant):
    path = tiny_gguf_factory(dtype=variant, **VARIANTS[variant], **tied(variant))
    ref = hf_load(path)
    prompts = tiny_prompts(ref.config.vocab_size)
    exact_cache = ModelShard.from_file(path, quant="native", kv_dtype=torch.float32)
    # BF16 weights take bfloat16 activations, as ggml's BF16 dot product does (8-bit mantissa: 2^-9 relative)
    bound = 1e-2 if variant == "bf16" else 1e-3
    for prompt, got in zip(prompts, ours_prefill_all(exact_cache, prompts)):
        assert rel_err(got, hf_logits(ref, prompt)) <= bound
    ours = ModelShard.from_file(path, quant="native")  # the default float16 KV cache
    assert ours.kv_dtype == torch.float16
    for prompt, got in zip(prompts, ours_prefill_all(ours, prompts)):
        assert rel_err(got, hf_logits(ref, prompt)) <= max(bound, 5e-3)
    # (greedy with the float32 cache: a float16 cache flips near-ties of these random models now and then, as
    # it does Ollama's against a float32 reference; and not for BF16, whose bfloat16 activations do the same)
    if variant != "bf16":
        for prompt, tokens in zip(prompts, ours_greedy_batched(exact_cache, prompts, GREEDY)):
            assert tokens == hf_greedy(ref, prompt, GREEDY)


@pytest.mark.parametrize("variant", ["q4_1", "q4_k", "q8_0", "f16"])
def test_memory_is_the_files(tiny_gguf_factory, variant):
    """A native shard holds about the file's tensor bytes (repacking adds no more than the block layout's
    padding), where float32 holds 4 bytes per weight."""
    path = tiny_gguf_factory(dtype=variant, **VARIANTS[variant])
    file_bytes = sum(int(t.n_bytes) for t in open_gguf(path).tensors)
    held = ModelShard.from_file(path, quant="native").weight_bytes()
    assert 0.95 * file_bytes <= held <= 1.1 * file_bytes, (held, file_bytes)
    assert ModelShard.from_file(path).weight_bytes() > 1.5 * held


def test_loader_keeps_the_files_bytes(tiny_gguf_factory):
    path = tiny_gguf_factory(dtype="q4_k", **K_SHAPE)
    cfg = read_config(path)
    spec = ShardSpec((1, 3), (0, 1), (256, 512), False, True)  # TP slice on the 256-input block grid
    w = load_weights(path, cfg, spec, quant="native")
    down = w["layers.1.down"]
    assert isinstance(down, GGUFRows) and down.type_name == "Q4_K" and down.shape == (256, 256)
    full = torch.from_numpy(gguf.quants.dequantize(
        next(t for t in open_gguf(path).tensors if t.name == "blk.1.ffn_down.weight").data, gguf.GGMLQuantizationType.Q4_K))
    assert torch.equal(down.dequantize(), full[:, 256:512])
    assert isinstance(w["lm_head"], GGUFRows) and "embed" not in w


def test_off_grid_column_cut_is_kept_dense(tiny_gguf_factory):
    """A row-parallel cut off the block grid (here 128 of Q4_K's 256) still loads, as float32 values."""
    path = tiny_gguf_factory(dtype="q4_k", **K_SHAPE)
    cfg = read_config(path)
    w = load_weights(path, cfg, ShardSpec((0, 1), (0, 1), (0, 128), True, False), quant="native")
    assert isinstance(w["layers.0.down"], torch.Tensor) and w["layers.0.down"].dtype == torch.float32
    assert isinstance(w["layers.0.gate"], GGUFRows)  # row selections are always on the grid


def run_plan(path, plan, quant="native") -> list[torch.Tensor]:
    cfg = read_config(path)
    pipe = LocalPipeline([LocalStage([ModelShard(cfg, s, load_weights(path, cfg, s, quant=quant), quant,
                                                  torch.float32) for s in stage]) for stage in plan])
    try:
        caches = pipe.new_cache(64)
        prompts = tiny_prompts(cfg.vocab_size, seed=5)
        flat = torch.tensor([t for p in prompts for t in p])
        ids = list(range(len(prompts)))
        outs = [pipe.forward(flat, ids, [len(p) for p in prompts], caches, output="logits")]
        for _ in range(3):
            outs.append(pipe.forward(outs[-1].argmax(-1), ids, [1] * len(ids), caches, output="logits"))
        return outs
    finally:
        pipe.close()


@pytest.mark.parametrize("variant, splits", [
    ("q4_1", "pp2"), ("q4_1", "tp2"), ("q8_0", "pp2xtp2"), ("q4_k", "tp2"), ("q6_k", "pp2"),
])
def test_sharded_native_equals_unsharded(tiny_gguf_factory, variant, splits):
    path = tiny_gguf_factory(dtype=variant, **(K_TP_SHAPE if variant == "q4_k" else VARIANTS[variant]))
    cfg = read_config(path)
    L, F, A = cfg.n_layers, cfg.ffn_size, cfg.n_kv_heads
    half_ffn = F // 2  # 64 (legacy, 32-blocks) or 256 (K-quants): on the grid
    plan = {
        "pp2": make_plan(cfg, [(0, L // 2), (L // 2, L)]),
        "tp2": make_plan(cfg, [(0, L)], [(0, A - 1), (A - 1, A)], [(0, half_ffn), (half_ffn, F)]),
        "pp2xtp2": make_plan(cfg, [(0, 1), (1, L)], [(0, 1), (1, A)], [(0, half_ffn), (half_ffn, F)]),
    }[splits]
    want = run_plan(path, [[ShardSpec.full(cfg)]])
    # Pipeline stages compute exactly what one shard does. A tensor-parallel split sums the row-parallel partials
    # in another order (float32 ulps), and our kernels quantise activations (model/kernels/common.h): an ulp can
    # move a value across a rounding boundary of the second int8 level, a 2^-15 step, so split and unsplit agree to
    # ~1e-4 over the layers (the torch fallback, which does not quantise, to ~1e-6).
    bound = 1e-5 if splits == "pp2" else 2e-4
    for step, (a, b) in enumerate(zip(run_plan(path, plan), want)):
        assert rel_err(a, b) <= bound, f"step {step}"


# --- KV cache types (Ollama's OLLAMA_KV_CACHE_TYPE: f32 | f16 | q8_0) --------------------------------------------


def test_q8_0_cache_round_trips_within_half_a_step():
    from ollama_distributed.model.kv_cache import KVCache

    cache = KVCache(2, 3, 64, 600, "q8_0", initial_slots=1, initial_capacity=4)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 3, 64, generator=g) * 3, torch.randn(5, 3, 64, generator=g)
    k[:, :, 7] = 40.0  # an outlier channel: only its own 32-block's scale grows
    cache.prepare([0], [5])
    cache.write(1, torch.zeros(5, dtype=torch.int64), torch.arange(5), k, v)
    cache.commit([0], [5])
    cache.prepare([1], [590])  # grows slots and capacity: quantised values and scales move along
    keys, values = cache.span(1, 0, 5)
    for got, want in ((keys, k), (values, v)):
        step = want.transpose(0, 1).unflatten(-1, (2, 32)).abs().amax(-1, keepdim=True) / 127
        # half a step, plus the scale's own float16 rounding (2^-11 relative) times |q| <= 127, as ggml's
        assert ((got - want.transpose(0, 1)).unflatten(-1, (2, 32)).abs() <= step * (0.5 + 127 / 2**11)).all()
    assert cache.nbytes() == 2 * (2 * 2 * 3 * 600 * 64 + 2 * 2 * 2 * 3 * 600 * 2)


@pytest.mark.parametrize("kv, bound", [("f32", 1e-3), ("f16", 5e-3), ("q8_0", 3e-2)])
def test_kv_cache_types_track_transformers(tiny_gguf_factory, kv, bound):
    from ollama_distributed.model.quant import kv_cache_dtype

    path = tiny_gguf_factory(dtype="q4_1", vocab=1024, hidden=128, n_heads=4, n_kv_heads=2)  # head_dim 32
    ref = hf_load(path)
    ours = ModelShard.from_file(path, quant="native", kv_dtype=kv_cache_dtype("auto", kv))
    prompts = tiny_prompts(ref.config.vocab_size)
    # decode after a cached prefix, so the cache's type is what the last token attends over
    for prompt in prompts[1:3]:
        cache = ours.new_cache(64)
        ours.forward(torch.tensor(prompt[:-1]), [0], [len(prompt) - 1], cache)
        got = ours.forward(torch.tensor(prompt[-1:]), [0], [1], cache)
        assert rel_err(got[0], hf_logits(ref, prompt)[-1]) <= bound


@pytest.mark.parametrize("kv, head_dim", [("f16", 16), ("f16", 32), ("q8_0", 32)])
def test_ragged_mixed_steps_in_each_cache_type(tiny_gguf_factory, kv, head_dim):
    """Prefill, chunked prefill beside decode rows, batched decode and a freed slot (test_sharded's scenario) with
    the cache in float16 (head_dim 16: torch's attention; 32: our kernels) or q8_0 (torch's), against the same
    weights with a float32 cache."""
    from ollama_distributed.model.quant import kv_cache_dtype
    from tests.model.test_sharded import reference_outputs

    path = tiny_gguf_factory(dtype="q4_0", vocab=1024, hidden=64 * head_dim // 16, n_heads=4, n_kv_heads=2)

    def outputs(shard: ModelShard) -> list[torch.Tensor]:
        # test_sharded's steps, then two decode rows and a prompt chunk in one step (decode rows attend together)
        cache = shard.new_cache(128)
        extra = shard.forward(torch.arange(3, 13), [0, 1, 7], [1, 1, 8], cache, output="all_logits")
        return [*reference_outputs(shard), extra]

    want = outputs(ModelShard.from_file(path, quant="native", kv_dtype=torch.float32))
    got = outputs(ModelShard.from_file(path, quant="native", kv_dtype=kv_cache_dtype("auto", kv)))
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and rel_err(a, b) <= 3e-2, f"step {step}"
