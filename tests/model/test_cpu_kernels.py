"""Our CPU kernels (model/cpu_kernels.py) against the torch ops they replace, on shapes that reach every code path
(tiles of 1-4 activation rows and their remainders, 4-block decode tiles and leftover blocks, serial and parallel
attention). Whole models through these kernels: test_quant.py (int4), test_transformer.py and test_sharded.py
(fp32 vs transformers and across splits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ollama_distributed.model import cpu_kernels, rope
from ollama_distributed.model.quant import QuantMatrix, quantize_rtn

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no AVX-512 VNNI or no compiler here")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("n, k", [(20, 96), (64, 576), (1000, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16])
def test_q4_matmul_matches_dense_matmul(n, k, m):
    g = torch.Generator().manual_seed(n + k + m)
    qm = quantize_rtn(torch.randn(n, k, generator=g))
    lin = cpu_kernels.Q4Linear(qm.codes, qm.scale, qm.zero)
    # The kernel holds d and m = zero - 8 d in float16 (a Q4_1 file's own precision): the reference uses those.
    d16 = qm.scale.half().float()
    ref_w = QuantMatrix(qm.codes, d16, (qm.zero - 8 * qm.scale).half().float() + 8 * d16).dequantize()
    x = torch.randn(m, k, generator=g)
    x[:, 5] *= 100  # an outlier channel, as LLM activations have: two int8 levels keep its group's small inputs
    got = lin(x)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # ~15 bits per activation group; the outlier's groups keep fewer for their small inputs: 1.7e-4 measured at
    # worst (bf16 activations, torch's kernel: ~1e-2)
    assert rel_err(got, x @ ref_w.T) <= 5e-4


def test_q4_matmul_rejects_what_it_cannot_compute():
    qm = quantize_rtn(torch.randn(8, 64))
    lin = cpu_kernels.Q4Linear(qm.codes, qm.scale, qm.zero)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.ops().q4_matmul(torch.randn(1, 32), lin.codes, lin.d, lin.m)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.ops().q4_matmul(torch.randn(1, 64).double(), lin.codes, lin.d, lin.m)
    x = torch.randn(3, 64)
    assert torch.equal(lin(x.bfloat16()), lin(x.bfloat16().float()))  # the Linear casts other dtypes to float32
    assert not cpu_kernels.fits(6, 64) and not cpu_kernels.fits(8, 48) and cpu_kernels.fits(8, 64)


@pytest.mark.parametrize("m", [1, 7])
def test_rms_norm_matches_torch(m):
    x, w = torch.randn(m, 576) * 3, torch.rand(576) + 0.5
    assert rel_err(cpu_kernels.ops().rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5)) <= 1e-6


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv,hd", [(9, 3, 64), (8, 4, 64), (12, 2, 64), (14, 2, 64), (8, 2, 128)])
def test_attend_cached_matches_sdpa_per_sequence(cache_dtype, heads, kv, hd):
    """Sequences of 1, 7 and 405 cached positions in scattered slots of one layer's cache (405 keys x 3 queries
    x 64 dims takes the multi-threaded branch; keys 16 at a time, then 5 one by one), in a float32 or float16 cache
    (Ollama's default KV type).
    Query heads per KV head: 3 (SmolLM2), 2, 6 and 7 (a group of 4 heads, then the rest together), 4 at 128 dims."""
    g = torch.Generator().manual_seed(5)
    cache_k = torch.randn(6, kv, 512, hd, generator=g).to(cache_dtype)  # (slots, kv, capacity, hd): one layer
    cache_v = torch.randn(6, kv, 512, hd, generator=g).to(cache_dtype)
    slots, lengths = torch.tensor([4, 0, 2]), torch.tensor([1, 7, 405])
    q = torch.randn(3, heads, hd, generator=g)
    got = cpu_kernels.ops().attend_cached(q, cache_k, cache_v, slots, lengths)
    for b, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        keys, values = cache_k[slot, :, :n].float(), cache_v[slot, :, :n].float()
        want = F.scaled_dot_product_attention(q[b].view(1, kv, heads // kv, hd), keys[None], values[None]).reshape(-1)
        assert rel_err(got[b], want) <= 1e-5, (b, n)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.ops().attend_cached(q, cache_k, cache_v, slots, torch.tensor([1, 7, 513]))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_rope_cache_matches_rope_and_index_put(cache_dtype):
    g = torch.Generator().manual_seed(3)
    heads, kv, hd, n = 9, 3, 64, 5
    qkv = torch.randn(n, (heads + 2 * kv) * hd, generator=g)
    slots, pos = torch.tensor([0, 0, 2, 3, 3]), torch.tensor([4, 5, 0, 7, 8])
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = rope.cos_sin(inv, pos, torch.float32)
    k_cache, v_cache = torch.zeros(4, kv, 16, hd, dtype=cache_dtype), torch.zeros(4, kv, 16, hd, dtype=cache_dtype)
    q = cpu_kernels.ops().rope_cache(qkv, cos, sin, k_cache, v_cache, slots, pos, heads, kv)

    qk = rope.apply(qkv[:, : (heads + kv) * hd].view(n, heads + kv, hd), cos, sin)
    want_k, want_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    want_k[slots, :, pos] = qk[:, heads:].to(cache_dtype)
    want_v[slots, :, pos] = qkv[:, (heads + kv) * hd :].view(n, kv, hd).to(cache_dtype)  # (rounded to nearest)
    assert torch.allclose(q, qk[:, :heads], rtol=0, atol=1e-6)
    # float16: the same rounding of values that differ by float32 ulps can land one float16 ulp apart
    assert torch.allclose(k_cache.float(), want_k.float(), rtol=1e-3 if cache_dtype == torch.float16 else 0, atol=1e-6)
    assert torch.equal(v_cache, want_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.ops().rope_cache(qkv, cos, sin, k_cache, v_cache, slots, pos + 10, heads, kv)
