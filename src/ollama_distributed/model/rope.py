"""Rotary position embedding (RoPE) in HF's rotate_half layout, with the scalings Llama-family models use.

Su et al., "RoFormer" (2021) for RoPE; inverse frequencies theta^(-2i/d) as in transformers'
`_compute_default_rope_parameters`; Llama 3.1's low/high-frequency blend as described in transformers'
`_compute_llama3_parameters` (factor, low_freq_factor, high_freq_factor, original context length); Phi-3's
LongRoPE as transformers' `_compute_longrope_parameters` and llama.cpp's `ggml_rope_ext` with freq_factors (each
frequency divided by its factor; cos and sin multiplied by the attention factor).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_freq(cfg: ModelConfig, rope_freqs: torch.Tensor | None = None, long: bool = False) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, scaled per cfg.rope_scaling.

    rope_freqs: llama.cpp's per-frequency divisors (GGUF `rope_freqs.weight`); when given they are the exact
    llama3 scaling of that file and take precedence over the config's (approximate) description.
    long: for "longrope", the long-context factors (see `uses_long_factors`), else the short ones.
    """
    d = cfg.head_dim
    rs = cfg.rope_scaling
    exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    if rs.kind == "longrope":  # 1 / (factor_i * theta^(2i/d)), written as transformers writes it
        ext = torch.tensor(rs.long_factor if long else rs.short_factor, dtype=torch.float32)
        return 1.0 / (ext * cfg.rope_theta ** exponents)
    base = 1.0 / (cfg.rope_theta ** exponents)
    if rope_freqs is not None:
        return base / rope_freqs.float()
    if rs.kind == "linear":
        return base / rs.factor
    if rs.kind == "llama3":
        low_wavelen = rs.original_context_length / rs.low_freq_factor
        high_wavelen = rs.original_context_length / rs.high_freq_factor
        wavelen = 2 * math.pi / base
        scaled = torch.where(wavelen > low_wavelen, base / rs.factor, base)
        smooth = (rs.original_context_length / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    if rs.kind != "none":
        raise ValueError(f"RoPE scaling {rs.kind!r} is not implemented")
    return base


def uses_long_factors(cfg: ModelConfig, context: int) -> bool:
    """Whether a sequence that may grow to `context` tokens rotates with LongRoPE's long factors.

    llama.cpp decides once per context, by its size: `n_ctx_per_seq > n_ctx_orig_yarn` (llama-model.cpp
    `get_rope_factors`), so every key of a sequence is rotated alike; `context` is here the KV cache's per-sequence
    capacity (max_seq_len), llama.cpp's n_ctx_per_seq. (transformers instead switches by the current length,
    `longrope_frequency_update`; the two agree whenever a sequence stays on one side of the original context.)
    """
    rs = cfg.rope_scaling
    return rs.kind == "longrope" and context > rs.original_context_length


def attention_factor(cfg: ModelConfig) -> float:
    """The factor cos and sin are multiplied by (LongRoPE's attention scaling; 1 otherwise)."""
    return cfg.rope_scaling.attention_factor if cfg.rope_scaling.kind == "longrope" else 1.0


def cos_sin(inv: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
            scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin of shape (N, 1, head_dim) for int64 positions (N,), computed in float32 then cast (as
    HF does). The sin's first half is negated so that `apply` needs no negation (see there). `scale` multiplies
    both (LongRoPE's attention factor: transformers' `attention_scaling`, llama.cpp's rope attn_factor/mscale), so
    q·k is scaled by its square."""
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    sin[..., : inv.shape[0]].neg_()
    return cos.to(dtype), sin.to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (N, heads, head_dim) by the angles of its tokens: x*cos + rotate_half(x)*sin.

    rotate_half(x) = cat(-x2, x1) for halves x1, x2, so rotate_half(x)*sin = roll(x, half)*signed_sin with
    signed_sin = cat(-sin1, sin2): bit-identical (negation is exact) in 4 ops per layer instead of 7.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
