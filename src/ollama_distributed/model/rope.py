"""Rotary position embedding (RoPE) in HF's rotate_half layout, with the scalings Llama-family models use.

Su et al., "RoFormer" (2021) for RoPE; inverse frequencies theta^(-2i/d) as in transformers'
`_compute_default_rope_parameters`; Llama 3.1's low/high-frequency blend as described in transformers'
`_compute_llama3_parameters` (factor, low_freq_factor, high_freq_factor, original context length).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_freq(cfg: ModelConfig, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, scaled per cfg.rope_scaling.

    rope_freqs: llama.cpp's per-frequency divisors (GGUF `rope_freqs.weight`); when given they are the exact
    llama3 scaling of that file and take precedence over the config's (approximate) description.
    """
    d = cfg.head_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
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


def cos_sin(inv: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin of shape (N, 1, head_dim) for int64 positions (N,), computed in float32 then cast (as
    HF does). The sin's first half is negated so that `apply` needs no negation (see there)."""
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    sin = emb.sin()
    sin[..., : inv.shape[0]].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (N, heads, head_dim) by the angles of its tokens: x*cos + rotate_half(x)*sin.

    rotate_half(x) = cat(-x2, x1) for halves x1, x2, so rotate_half(x)*sin = roll(x, half)*signed_sin with
    signed_sin = cat(-sin1, sin2): bit-identical (negation is exact) in 4 ops per layer instead of 7.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
