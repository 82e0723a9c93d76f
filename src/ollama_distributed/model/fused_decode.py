"""A decode step through all of a shard's layers in one call to our CPU kernels (kernels/cpu_kernels.cpp DecodePlan).

Why: with the weights in their file's types (`--dtype auto`), a SmolLM2 decode step spent ~2.3 ms in matmuls and
~5.5 ms in the ~15 torch ops and pybind calls per layer around them (norms, adds, split, SiLU, the kernels' argument
checks, Python); llama.cpp's whole step was 5.7 ms. DecodePlan runs each layer's RMSNorm → q/k/v matmul (+ bias,
q/k norms) → RoPE and cache write → attention → o matmul (+ all-reduce) → residual → RMSNorm → gate/up matmul →
SiLU·up → down matmul (+ all-reduce) → residual in C++, with the same kernels and order of operations as
ModelShard._block (bench/README.md has the numbers).

Where it applies (`build` returns None otherwise, and the shard keeps its op-by-op path): float32 stream on CPU
with our AVX-512 kernels, a float32 or float16 KV cache (q8_0 takes torch's path), every layer's matrices
model/native.py NativeMatrix (or file_format.Stacked parts of them), SiLU FFNs, no mixture of experts, no sliding
window, no post-norms or soft-capping (llama, qwen2 and qwen3 files; tensor-parallel and pipeline shards alike).
Only steps in which every sequence brings one new token (decode) take it.
"""

from __future__ import annotations

from typing import Any

import torch

from . import cpu_kernels
from .file_format import Stacked
from .native import Q8_1_PARTNERS, NativeMatrix


def _parts(w: Any) -> list[tuple] | None:
    """A weight as the plan's (codes, planes, d, dmin, sc, m, n, q8_1) parts, or None where it is not NativeMatrix
    parts (NativeMatrix._kernel_args)."""
    parts = w.parts if isinstance(w, Stacked) else [w]
    if not all(isinstance(p, NativeMatrix) and p.codes.device.type == "cpu" for p in parts):
        return None
    return [(p.codes, p.planes, p.d, p.dmin, p.sc, p.m, p.out_features, p.type_name in Q8_1_PARTNERS) for p in parts]


def build(shard: Any) -> Any | None:
    """The kernels' DecodePlan for `shard` (a ModelShard), or None where it does not apply (see the module doc)."""
    cfg = shard.cfg
    ops = shard._cache_ops
    if ops is None or not hasattr(ops, "DecodePlan") or shard.quant != "native" or not shard.layers:
        return None
    # NativeMatrix runs on native_ops(): only where that is this same AVX-512 build do both paths compute alike
    if cpu_kernels.native_ops() is not ops:
        return None
    if cfg.activation != "silu" or cfg.attn_softcap or shard.ffn_local % 16:
        return None
    plan = ops.DecodePlan(cfg.hidden_size, shard.n_heads, shard.n_kv, cfg.head_dim, shard.ffn_local,
                          cfg.rms_norm_eps, shard._q_factor)
    for layer in shard.layers:
        post_norms = layer.post_attn_norm is not None or layer.post_ffn_norm is not None
        if layer.moe is not None or layer.sliding or post_norms:
            return None
        parts = [_parts(w) for w in (layer.wqkv, layer.wo, layer.wgu, layer.wdown)]
        if any(p is None for p in parts):
            return None
        vectors = [layer.attn_norm, layer.ffn_norm, layer.bqkv, layer.q_norm, layer.k_norm]
        if any(v is not None and (v.dtype != torch.float32 or v.device.type != "cpu") for v in vectors):
            return None
        attn_norm, ffn_norm, bias, q_norm, k_norm = (None if v is None else v.contiguous() for v in vectors)
        qkv, o, gu, down = parts
        plan.add_layer(attn_norm, ffn_norm, qkv, bias, q_norm, k_norm, o, gu, down)
    return plan
