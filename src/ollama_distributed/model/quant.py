"""Weight-only quantised matrices for CPU decode: 4-bit groups for the layers, a 4-bit + float16 output head.

Single-sequence decode reads every weight once per token, so its speed is bytes per token over memory bandwidth
(bench/README.md, "Where the time goes"). GGUF's 4-bit types already hold the layers as 4-bit codes with an
affine scale per block of 32 inputs, in the form W[n, k] = (q[n, k] − 8) · s[g, n] + z[g, n], g = k // 32:
    Q4_0 (ggml-quants.c dequantize_row_q4_0): w = d · (q − 8)        → s = d, z = 0
    Q4_1 (dequantize_row_q4_1):               w = d · q + m          → s = d, z = m + 8 d
so the layers keep the file's codes. Other tensor types (F16, Q8_0, K-quants …) are dequantised and re-quantised
per group by round-to-nearest over the group's [min, max] (at most half a step per weight;
tests/model/test_quant.py). The output head (vocab × hidden, a fifth of SmolLM2's weights) ranks the vocabulary
with 4-bit rows and recomputes its top candidates from a float16 table (`RefinedHead`), as its logits decide every
token; a tied embedding shares that table.

Two kernels run the matrices (`pack` picks): ours (model/cpu_kernels.py, AVX-512 VNNI: float32 in and out, scales in
float16, i.e. a Q4_1 file's own values) and, where it cannot run, torch's `aten._weight_int4pack_mm_for_cpu`
(bf16 activations and outputs, scales rounded to bf16).

A `QuantMatrix` is the unpacked form (codes + per-group scale/zero in torch (out, in) layout) so that shards can
select rows, permute heads and fuse q/k/v before packing; `pack` turns it into a kernel's layout, or into a dense
float32 matrix where neither kernel's shape rules hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_kernels, formats
from .cpu_kernels import Q4Linear
from .kv_cache import Q8_0
from .linear import linear, weight_tensors

GROUP = 32  # GGUF's block of 32 inputs (QK4_0 = QK4_1 = 32 in ggml-common.h)
TORCH_INT4_DTYPE = torch.bfloat16  # torch's CPU int4 kernel takes bf16 activations (fp32 ones run ~25x slower)
QUANT_FORMATS = ("int4", "native")  # native: the file's own types (model/file_format.py)
# Resolved once: looking an op up through torch.ops costs a few µs, paid 120 times per decoded token otherwise.
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
# `--dtype` names (model/formats.py, where each format's meaning lives) → (torch compute dtype, loader quant mode)
WEIGHT_FORMATS: dict[str, tuple[torch.dtype, str | None]] = {
    f.name: (getattr(torch, f.compute_dtype), f.quant) for f in formats.FORMATS.values()
}
# KV cache element types (model/formats.py kv_cache_type) as KVCache takes them: torch dtypes, or "q8_0"
KV_DTYPES: dict[str, torch.dtype | str] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
                                           "q8_0": Q8_0}


def weight_format(name: str) -> tuple[torch.dtype, str | None]:
    """(dtype, quant) for a `--dtype` name; ValueError naming the choices otherwise."""
    return WEIGHT_FORMATS[formats.weight_format_info(name).name]


def kv_cache_dtype(weight_format_name: str, setting: str | None = None) -> torch.dtype | str:
    """The KVCache dtype a shard of `weight_format_name` holds under `setting` (f32|f16|q8_0, None: the format's
    default; model/formats.py kv_cache_type)."""
    return KV_DTYPES[formats.kv_cache_type(weight_format_name, setting)]


@dataclass
class QuantMatrix:
    """4-bit codes of an (out, in) matrix with an affine (scale, zero) per row and group of GROUP inputs."""

    codes: torch.Tensor  # (N, K) uint8 in [0, 16)
    scale: torch.Tensor  # (N, K // GROUP) float32
    zero: torch.Tensor  # (N, K // GROUP) float32: w = (q - 8) * scale + zero

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantMatrix":
        """Apply the same row transform (a head permutation, a selection) to codes, scales and zeros."""
        return QuantMatrix(fn(self.codes), fn(self.scale), fn(self.zero))

    @staticmethod
    def cat(parts: list["QuantMatrix"]) -> "QuantMatrix":
        """Stack along the output rows (fused q/k/v, gate/up)."""
        return QuantMatrix(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero")))

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix the codes stand for (tests, and the dense fallback)."""
        n, k = self.shape
        q = self.codes.float().view(n, k // GROUP, GROUP) - 8
        return (q * self.scale[..., None] + self.zero[..., None]).view(n, k)


def from_gguf_blocks(raw: np.ndarray, type_name: str, cols: tuple[int, int]) -> QuantMatrix | None:
    """Exact codes of Q4_0/Q4_1 rows (raw: (rows, bytes per row) uint8), columns [c0, c1); None for other types
    or block-unaligned columns (the caller re-quantises the dequantised floats instead).

    Block layouts (ggml-common.h): block_q4_0 = {f16 d; u8 qs[16]}, block_q4_1 = {f16 d; f16 m; u8 qs[16]};
    element j < 16 of a block is qs[j] & 0xF and element j + 16 is qs[j] >> 4.
    """
    c0, c1 = cols
    if type_name not in ("Q4_0", "Q4_1") or c0 % GROUP or c1 % GROUP:
        return None
    head = 2 if type_name == "Q4_0" else 4
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, head + 16)[:, c0 // GROUP : c1 // GROUP]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., head:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, c1 - c0)
    if type_name == "Q4_0":
        zero = np.zeros_like(d)
    else:
        zero = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
    return QuantMatrix(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero))


def quantize_rtn(w: torch.Tensor) -> QuantMatrix:
    """Round-to-nearest 4-bit codes over each group's [min, max] (for tensors that are not 4-bit in the file)."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"cannot quantise {k} input columns in groups of {GROUP}")
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((g - lo[..., None]) / safe[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(n, k)
    return QuantMatrix(codes, scale, lo + 8 * scale)


class Int4Linear:
    """Y = X Wᵀ with W as packed 4-bit groups (see module docstring); X is cast to bf16."""

    def __init__(self, qm: QuantMatrix) -> None:
        n, k = qm.shape
        self.out_features, self.in_features = n, k
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qm.codes.to(torch.int32), 1)
        self.scales_zeros = torch.stack([qm.scale.t(), qm.zero.t()], dim=-1).to(TORCH_INT4_DTYPE).contiguous()  # (G, N, 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # (the dtype test in Python costs less than dispatching a no-op .to(), 4 times per layer per token)
        x = x if x.dtype is TORCH_INT4_DTYPE else x.to(TORCH_INT4_DTYPE)
        return _INT4_MM(x, self.packed, GROUP, self.scales_zeros)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_zeros]


class RefinedHead:
    """The output head of quantised shards: every logit from 4-bit rows (`quantize_rtn` groups in the int4
    kernel), then each row's top REFINE logits recomputed in float32 from a float16 copy.

    The head decides every greedy token, and a 4-bit (or int8) head alone flips near-ties: its logits are off by a
    few tenths, and the int8 kernel also returns bf16, whose 8-bit mantissa rounds logits near 20 to steps of 0.125.
    A float16 head fixes that but reads 4x the bytes. Ranking with the cheap rows and refining only the candidates
    keeps the small read: the true maximum is within the approximate top-64 unless 64 logits sit within the 4-bit
    error of it, and sampling with Ollama's default top_k = 40 sees exact logits for all its candidates.
    Measured on SmolLM2 (bench/README.md section 5): free-running greedy output equal to fp32's on 20 prompts × 32
    tokens is the same for 4-bit and int8 ranking (81.7 % with a bf16 residual stream), and the 4-bit rows
    (14 MB vs 28 MB) cut a decode step from 11.1 to 9.3 ms. Rows of larger batches (prefill logits) take the
    float16 matmul itself: same top values, no (M, 64, H) gather.
    """

    REFINE = 64
    GATHER_ROWS = 64  # rows refined by gathering, (M, 64, H) float32 (9 MB for SmolLM2); more take the GEMM

    def __init__(self, w: torch.Tensor) -> None:
        w = w.float()
        self.out_features, self.in_features = w.shape
        self.table = w.to(torch.float16)  # (V, H); also the embedding table of a tied model (ModelShard)
        # (hidden sizes off the group grid rank with the float16 table itself; none of the supported models has one)
        self.rank: Weight | None = pack(quantize_rtn(w)) if self.in_features % GROUP == 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.GATHER_ROWS or self.rank is None:
            return F.linear(x.to(torch.float16), self.table).float()
        approx = linear(x, self.rank).float()  # (M, V)
        idx = approx.topk(min(self.REFINE, self.out_features), dim=-1, sorted=False).indices  # (M, k)
        exact = torch.bmm(self.table[idx].float(), x.float()[:, :, None])[..., 0]  # (M, k, H) @ (M, H, 1)
        return approx.scatter_(1, idx, exact)

    def tensors(self) -> list[torch.Tensor]:
        return [*weight_tensors(self.rank), self.table]


Weight = torch.Tensor | Q4Linear | Int4Linear | RefinedHead


def pack(qm: QuantMatrix) -> Weight:
    """The fastest kernel form of `qm` here: the VNNI kernel (model/cpu_kernels.py; float32 in and out) where the CPU
    has it, else torch's int4 kernel (bf16 in and out; `_convert_weight_to_int4pack_for_cpu` needs N % 16 == 0),
    else, where neither kernel's shape rules hold, the dense float32 matrix."""
    n, k = qm.shape
    if cpu_kernels.fits(n, k) and cpu_kernels.available():
        return Q4Linear(qm.codes, qm.scale, qm.zero)
    if n % 16 == 0 and k % GROUP == 0:
        return Int4Linear(qm)
    return qm.dequantize()
