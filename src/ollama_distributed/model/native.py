"""Weights kept in their GGUF file's quantisation: `NativeMatrix` (a kernel for each of the common types) and
`GGUFBlocks` (every other type, dequantised a chunk of rows at a time).

`NativeMatrix` repacks a tensor's blocks losslessly into one layout for all of NATIVE_TYPES, in the unified form
    w[n, k] = d[n, s] · sc[n, g(, h)] · q[n, k]  −  dmin[n, s] · m[n, g(, h)]
with q unsigned 4/5/6/8-bit codes, g the group of 32 inputs (Q6_K: h the half-group of 16), s the super-block
(1 group for the legacy types, 8 for the K-quants' 256 inputs). Each type's block (ggml-common.h; values as
ggml-quants.c dequantize_row_* and gguf-py's gguf/quants.py compute them) maps onto it as:
    Q4_0  w = d·(q − 8)                 d, dmin = 8d               (sc = m = 1: no tensors)
    Q4_1  w = d·q + m                   d, dmin = −m
    Q5_0  w = d·(q − 16)                d, dmin = 16d
    Q5_1  w = d·q + m                   d, dmin = −m
    Q8_0  w = d·qs, qs int8             q = qs + 128, d, dmin = 128d
    Q4_K  w = d·sc·q − dmin·m           the file's d, dmin, 6-bit sc/m per 32 (get_scale_min_k4)
    Q5_K  as Q4_K with a 5th bit (qh)
    Q6_K  w = d·sc·(q − 32)             d, dmin = 32d, sc = m = the int8 scale per 16
d and dmin stay float16: the file's own halves, or those times a power of two (exact unless it overflows float16,
which `from_blocks` refuses with ScaleOverflowError; `from_gguf` then keeps the tensor as GGUFBlocks). Every weight
is then (d·sc)·q − dmin·m in float32 with an exact product, the same operations as gguf-py's dequantisers: the
portable path's values equal theirs bit for bit.

Layout (the kernel's, kernels/native_kernels.cpp; an extension of q4_matmul's): rows in blocks of 4, one 128-bit
lane per row; N is padded to a multiple of 4 with zero rows, which no output shows.
    codes  (N/4, G, 64) uint8     lane r, byte j = q[4b+r, 32g+j] & 15 | (q[4b+r, 32g+16+j] & 15) << 4
    planes (N/4, G, P, 2) int64   the u64 bit planes: plane p, word h, bit 16r+j = bit 4+p of q[4b+r, 32g+16h+j]
                                  (P = 0, 1, 2 for 4-, 5-, 6-bit codes; int64 as torch's uint64 has few ops)
Q8_0's 8-bit codes are kept whole instead (same bytes): codes (N/4, G, 128), byte 64h + 16r + j = q[4b+r, 32g+16h+j],
P = 0, so the kernel loads each half of 4 rows as it multiplies it (4 bit planes to merge cost it ~0.55x
llama.cpp's Q8_0 speed; bench/README.md).
    d, dmin (N/4, S, 4) float16;  sc, m (N/4, G, 4) int8, Q6_K (N/4, G, 2, 4) with m = sc, empty for legacy types.

Computation: the compiled kernel (model/cpu_kernels.py `native_ops()`: AVX-512 VNNI, with AMX tiles for batches
where the CPU has them, or AVX2) for CPU tensors, with activations quantised per 32 inputs (AVX-512: two int8
levels, ~15 bits; AVX2: one int16 level; kernels/common.h);
elsewhere (CUDA, no compiler, OLLAMA_DISTRIBUTED_CPU_KERNELS=0) the portable path dequantises CHUNK weights' worth
of rows at a time with torch ops and multiplies them with F.linear, so no whole float32 matrix exists at once.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from . import cpu_kernels, hugepages

NATIVE_TYPES: tuple[str, ...] = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# Inputs per GGUF block (QK4_0 … QK8_0 = 32, QK_K = 256 in ggml-common.h): tensor-parallel column splits cut here.
BLOCK_INPUTS: dict[str, int] = {t: 256 if t in K_QUANTS else 32 for t in NATIVE_TYPES}
PLANES: dict[str, int] = {"Q4_0": 0, "Q4_1": 0, "Q4_K": 0, "Q5_0": 1, "Q5_1": 1, "Q5_K": 1, "Q6_K": 2, "Q8_0": 0}
WHOLE_BYTES = ("Q8_0",)  # 8-bit codes kept as bytes (codes (N/4, G, 128)), not 4 bits + 4 planes
# Types whose ggml dot-product partner is Q8_1 (ggml-cpu/quants.c ggml_vec_dot_q4_1_q8_1): with one activation level
# (kernels built with -DOD_ACT_LEVELS=1) their offsets meet the activations' sums rounded as block_q8_1's s.
Q8_1_PARTNERS = ("Q4_1", "Q5_1")
GROUP = 32  # inputs per sub-scale and per activation scale
ROWS = 4  # rows per block of the layout (one per 128-bit lane)
CHUNK = 1 << 22  # weights dequantised at a time by the portable paths (16 MB of float32)


class ScaleOverflowError(ValueError):
    """A type's derived dmin (d times 8, 16, 32 or 128) does not fit float16: `from_gguf` keeps such a tensor as
    GGUFBlocks. (Real files' scales are far below: Q8_0's d = amax / 127 would need weights near 65504.)"""


def _block_shape(type_name: str) -> tuple[int, int]:
    """(inputs, bytes) per block of a GGUF type; ValueError for a name gguf does not know."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    except KeyError:
        raise ValueError(f"unknown GGUF type {type_name!r}") from None


def _check_rows(raw: np.ndarray, type_name: str, in_features: int) -> int:
    """Blocks per row of `raw` (rows, bytes_per_row) uint8 holding in_features inputs of type_name."""
    size, nbytes = _block_shape(type_name)
    if in_features <= 0 or in_features % size:
        raise ValueError(f"{type_name}: {in_features} inputs are not whole blocks of {size}")
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != in_features // size * nbytes:
        raise ValueError(f"{type_name}: expected uint8 rows of {in_features // size * nbytes} bytes for "
                         f"{in_features} inputs, got {raw.dtype} {raw.shape}")
    return in_features // size


def slice_columns(raw: np.ndarray, type_name: str, in_features: int, cols: tuple[int, int]) -> np.ndarray:
    """The bytes of inputs [c0, c1) of each row: whole blocks, so c0 and c1 must lie on the type's block grid."""
    _check_rows(raw, type_name, in_features)
    size, nbytes = _block_shape(type_name)
    c0, c1 = cols
    if not 0 <= c0 < c1 <= in_features or c0 % size or c1 % size:
        raise ValueError(f"{type_name}: columns [{c0}, {c1}) of {in_features} are not whole blocks of {size}")
    return raw[:, c0 // size * nbytes : c1 // size * nbytes]


def _f16(b: np.ndarray) -> np.ndarray:
    """(…, 2) bytes -> (…) float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _times(d: np.ndarray, k: int, type_name: str) -> np.ndarray:
    """d·k in float16: exact (k is a power of two) unless it overflows, which is refused."""
    with np.errstate(over="ignore"):
        out = (d.astype(np.float32) * k).astype(np.float16)
    if np.any(np.isinf(out) & np.isfinite(d)):
        big = float(np.abs(d[np.isfinite(d)]).max())
        raise ScaleOverflowError(f"{type_name}: a block scale of {big:g} times {k} overflows float16 "
                                 "(keep the tensor as GGUFBlocks)")
    return out


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(…, 16) bytes -> (…, 32) codes: low nibbles are inputs 0..15, high nibbles 16..31 (the legacy qs order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _unpack(blocks: np.ndarray, type_name: str) -> tuple[np.ndarray, ...]:
    """(N, B, bytes) blocks -> q (N, K) uint8, d and dmin (N, S) float16, sc and m (N, G[, 2]) int8 or None.
    Byte offsets from ggml-common.h's block structs."""
    n, nblk = blocks.shape[:2]
    b = blocks
    if type_name in ("Q4_0", "Q5_0", "Q8_0"):  # {d, [qh[4]], qs}: symmetric, w = d·(signed code)
        d = _f16(b[..., 0:2])
        if type_name == "Q4_0":
            q, dmin = _nibbles(b[..., 2:18]), _times(d, 8, type_name)
        elif type_name == "Q5_0":  # qh: bit j of the little-endian uint32 is input j's 5th bit
            q = _nibbles(b[..., 6:22]) | np.unpackbits(b[..., 2:6], axis=-1, bitorder="little") << 4
            dmin = _times(d, 16, type_name)
        else:
            q, dmin = b[..., 2:34] ^ np.uint8(0x80), _times(d, 128, type_name)  # int8 qs + 128 as u8
        return q.reshape(n, -1), d, dmin, None, None
    if type_name in ("Q4_1", "Q5_1"):  # {d, m, [qh[4]], qs}: w = d·q + m
        d, dmin = _f16(b[..., 0:2]), -_f16(b[..., 2:4])
        if type_name == "Q4_1":
            q = _nibbles(b[..., 4:20])
        else:
            q = _nibbles(b[..., 8:24]) | np.unpackbits(b[..., 4:8], axis=-1, bitorder="little") << 4
        return q.reshape(n, -1), d, dmin, None, None
    if type_name in ("Q4_K", "Q5_K"):  # {d, dmin, scales[12], [qh[32]], qs[128]}
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        s = b[..., 4:16]  # 8 (scale, min) pairs of 6 bits (ggml-quants.c get_scale_min_k4)
        lo, mid, top = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        sc = np.concatenate([lo & 63, (top & 15) | (lo >> 6) << 4], axis=-1)
        m = np.concatenate([mid & 63, (top >> 4) | (mid >> 6) << 4], axis=-1)
        qs = b[..., 16:144] if type_name == "Q4_K" else b[..., 48:176]
        # 32 bytes per pair of groups: low nibbles are group 2c, high nibbles group 2c + 1
        q = np.stack([qs.reshape(n, nblk, 4, 32) & 15, qs.reshape(n, nblk, 4, 32) >> 4], axis=3).reshape(n, nblk, 8, 32)
        if type_name == "Q5_K":  # qh[j] bit g: the 5th bit of input j of group g
            q = q | ((b[..., 16:48][:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
        return q.reshape(n, -1), d, dmin, sc.reshape(n, -1).view(np.int8), m.reshape(n, -1).view(np.int8)
    if type_name == "Q6_K":  # {ql[128], qh[64], int8 scales[16], d}: w = d·scale·(q − 32)
        ql, qh = b[..., 0:128].reshape(n, nblk, 2, 64), b[..., 128:192].reshape(n, nblk, 2, 1, 32)
        low = np.concatenate([ql & 15, ql >> 4], axis=-1)  # (…, half of 128, 128): inputs 0..63 low, 64..127 high
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (…, 2, 4, 32): bits 2s.. of input 32s + j
        q = low | high.reshape(n, nblk, 2, 128) << 4
        d = _f16(b[..., 208:210])
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(n, nblk * 8, 2)  # scale i: inputs 16i..
        return q.reshape(n, -1), d, _times(d, 32, type_name), sc, sc
    raise ValueError(f"{type_name} has no native kernel: expected one of {', '.join(NATIVE_TYPES)}")


def _by_block(a: np.ndarray, nb: int) -> torch.Tensor:
    """(4·nb, X, …) per row -> (nb, X, …, 4): the block's 4 rows innermost."""
    return _torch(np.moveaxis(a.reshape(nb, ROWS, *a.shape[1:]), 1, -1))


def _torch(a: np.ndarray) -> torch.Tensor:
    """A contiguous copy aligned to 64 bytes (numpy aligns to 16, and the kernel's 64-byte loads of codes across
    two cache lines would cost a split load each), on 2 MiB pages where it is large enough (model/hugepages.py)."""
    return hugepages.to_torch(a)


class NativeMatrix:
    """Y = X Wᵀ for W (out_features, in_features) kept in a GGUF type of NATIVE_TYPES (see the module doc)."""

    def __init__(self, type_name: str, out_features: int, in_features: int, codes: torch.Tensor,
                 planes: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor) -> None:
        self.type_name, self.out_features, self.in_features = type_name, out_features, in_features
        self.codes, self.planes, self.d, self.dmin, self.sc, self.m = codes, planes, d, dmin, sc, m
        # resolved once: a decode step makes ~7 calls per layer, where µs of Python count
        self._on_cpu = codes.device.type == "cpu"
        # (the last: Q8_1_PARTNERS, used by a one-level kernel build)
        self._kernel_args = (codes, planes, d, dmin, sc, m, out_features, type_name in Q8_1_PARTNERS)

    @classmethod
    def from_blocks(cls, raw: np.ndarray, type_name: str, in_features: int) -> "NativeMatrix":
        """From whole GGUF rows: raw (rows, bytes_per_row) uint8 of one tensor's type (rows already selected,
        permuted or concatenated by the caller; columns cut on whole blocks, see slice_columns)."""
        if type_name not in NATIVE_TYPES:
            raise ValueError(f"{type_name} has no native kernel: expected one of {', '.join(NATIVE_TYPES)}")
        nblk = _check_rows(raw, type_name, in_features)
        n = raw.shape[0]
        if n == 0:
            raise ValueError(f"{type_name}: no rows")
        q, d, dmin, sc, m = _unpack(raw.reshape(n, nblk, -1), type_name)
        shared = m is sc  # Q6_K: one tensor for both
        nb, ng = -(-n // ROWS), in_features // GROUP
        pad = nb * ROWS - n
        if pad:  # zero rows: codes 0, scales 0
            q, d, dmin, sc, m = (None if a is None else np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
                                 for a in (q, d, dmin, sc, m))
        q5 = q.reshape(nb, ROWS, ng, 2, 16)  # (block, row, group, half, j)
        if type_name in WHOLE_BYTES:  # (block, group, half, row, j)
            codes = q5.transpose(0, 2, 3, 1, 4).reshape(nb, ng, 128)
        else:
            codes = ((q5[:, :, :, 0] & 15) | (q5[:, :, :, 1] & 15) << 4).transpose(0, 2, 1, 3).reshape(nb, ng, 64)
        planes = np.zeros((nb, ng, 0, 2, 8), np.uint8)
        if PLANES[type_name]:  # bit 4+p of (block, row, group, half, j) -> (block, group, p, half, bit 16·row + j)
            high = np.ascontiguousarray((q5 >> 4).transpose(0, 2, 3, 1, 4)).reshape(nb, ng, 2, 64)
            planes = np.stack([np.packbits((high >> p) & 1, axis=-1, bitorder="little")
                               for p in range(PLANES[type_name])], axis=2)
        empty = torch.empty(0, dtype=torch.int8)
        tsc = empty if sc is None else _by_block(sc, nb)
        tm = tsc if shared else (empty if m is None else _by_block(m, nb))
        return cls(type_name, n, in_features, _torch(codes), _torch(np.ascontiguousarray(planes).view("<i8")[..., 0]),
                   _by_block(d, nb), _by_block(dmin, nb), tsc, tm)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held (for memory accounting; Q6_K's m is its sc, counted once)."""
        out = [self.codes, self.planes, self.d, self.dmin, self.sc]
        return out + [self.m] if self.m is not self.sc else out

    def to(self, device: Union[str, torch.device]) -> "NativeMatrix":
        moved = [t.to(device) for t in (self.codes, self.planes, self.d, self.dmin, self.sc)]
        m = moved[-1] if self.m is self.sc else self.m.to(device)
        return NativeMatrix(self.type_name, self.out_features, self.in_features, *moved, m)

    def _kernel(self):
        return cpu_kernels.native_ops() if self._on_cpu else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (…, in_features) -> (…, out_features) float32."""
        if x.dim() != 2 or x.dtype is not torch.float32 or not x.is_contiguous():
            lead = x.shape[:-1]
            return self(x.reshape(-1, self.in_features).float().contiguous()).reshape(*lead, self.out_features)
        ops = self._kernel()
        if ops is not None:
            return ops.qmatmul(x, *self._kernel_args)
        y = x.new_empty(x.shape[0], self.out_features)
        rows = max(ROWS, CHUNK // self.in_features // ROWS * ROWS)
        for r0 in range(0, self.out_features, rows):
            r1 = min(self.out_features, r0 + rows)
            y[:, r0:r1] = F.linear(x, self._dequant(slice(r0 // ROWS, -(-r1 // ROWS)))[: r1 - r0])
        return y

    def dequantize(self) -> torch.Tensor:
        """The (out, in) float32 matrix, with torch ops on the tensors' device (tests; small matrices)."""
        return self._dequant(slice(None))[: self.out_features]

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx as (len, in) float32: embedding lookups."""
        idx = idx.reshape(-1).long()
        ops = self._kernel()
        if ops is not None:
            return ops.dequant_rows(idx.contiguous(), *self._kernel_args)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.out_features):
            raise IndexError(f"rows outside [0, {self.out_features})")
        idx = idx.to(self.codes.device)
        out = self.codes.new_empty((idx.numel(), self.in_features), dtype=torch.float32)
        step = max(1, CHUNK // (ROWS * self.in_features))
        for i in range(0, idx.numel(), step):  # each lookup dequantises its row's block of 4
            part = idx[i : i + step]
            blocks = self._dequant(part // ROWS).view(-1, ROWS, self.in_features)
            out[i : i + step] = blocks[torch.arange(part.numel(), device=part.device), part % ROWS]
        return out

    def _dequant(self, sel) -> torch.Tensor:
        """Blocks `sel` (a slice or index tensor of blocks) -> (4·len, in) float32: (d·sc)·q − dmin·m."""
        c = self.codes[sel]
        nb, ng = c.shape[:2]
        if c.shape[2] == 2 * 64:  # whole bytes: (nb, G, half, row, j) -> (nb, G, 4, 32)
            q = c.view(nb, ng, 2, ROWS, 16).transpose(2, 3).reshape(nb, ng, ROWS, GROUP)
        else:
            c = c.view(nb, ng, ROWS, 16)
            q = torch.cat([c & 15, c >> 4], dim=-1)  # (nb, G, 4, 32)
        if self.planes.shape[2]:
            # a word's bit 16r + j is bit j % 8 of its byte 2r + j // 8 (little-endian)
            by = self.planes[sel].view(torch.uint8).view(nb, ng, -1, 2, 8)
            shifts = torch.arange(8, dtype=torch.uint8, device=c.device)
            bits = ((by.unsqueeze(-1) >> shifts) & 1).view(nb, ng, -1, 2, ROWS, 16)
            bits = bits.transpose(3, 4).reshape(nb, ng, -1, ROWS, 32)  # (…, plane, row, input 16·half + j)
            for p in range(bits.shape[2]):
                q = q | bits[:, :, p] << (4 + p)
        q = q.float()
        d, dmin = self.d[sel].float(), self.dmin[sel].float()  # (nb, S, 4)
        if not self.sc.numel():
            w = d[..., None] * q - dmin[..., None]
        else:
            d, dmin = d.repeat_interleave(ng // d.shape[1], dim=1), dmin.repeat_interleave(ng // d.shape[1], dim=1)
            sc, m = self.sc[sel].float(), self.m[sel].float()
            if sc.dim() == 4:  # Q6_K: (nb, G, 2, 4) scales of inputs 0..15 and 16..31
                scale, offset = d[:, :, None] * sc, dmin[:, :, None] * m  # (nb, G, 2, 4)
                w = scale.transpose(2, 3)[..., None] * q.view(nb, ng, ROWS, 2, 16) - offset.transpose(2, 3)[..., None]
                w = w.reshape(nb, ng, ROWS, 32)
            else:
                w = (d * sc)[..., None] * q - (dmin * m)[..., None]
        return w.permute(0, 2, 1, 3).reshape(nb * ROWS, ng * GROUP)


class GGUFBlocks:
    """Any other GGUF type (Q2_K, Q3_K, IQ*, …) kept as the file's bytes and dequantised by gguf-py a chunk of
    rows at a time for each call: slow (numpy on the CPU), but exact, and never the whole matrix in float32."""

    def __init__(self, raw: torch.Tensor, type_name: str, in_features: int) -> None:
        self.raw, self.type_name, self.in_features = raw, type_name, in_features
        self.out_features = raw.shape[0]
        self._qtype = GGMLQuantizationType[type_name]

    @classmethod
    def from_blocks(cls, raw: np.ndarray, type_name: str, in_features: int) -> "GGUFBlocks":
        _check_rows(raw, type_name, in_features)
        return cls(torch.from_numpy(np.ascontiguousarray(raw)), type_name, in_features)

    def tensors(self) -> list[torch.Tensor]:
        return [self.raw]

    def to(self, device: Union[str, torch.device]) -> "GGUFBlocks":
        return GGUFBlocks(self.raw.to(device), self.type_name, self.in_features)

    def _rows(self, raw: torch.Tensor) -> torch.Tensor:
        w = gguf_dequantize(raw.cpu().numpy(), self._qtype).reshape(raw.shape[0], self.in_features)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(raw.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        y = x.new_empty(x.shape[0], self.out_features)
        rows = max(1, CHUNK // self.in_features)
        for r0 in range(0, self.out_features, rows):
            y[:, r0 : r0 + rows] = F.linear(x, self._rows(self.raw[r0 : r0 + rows]))
        return y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self._rows(self.raw)

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self._rows(self.raw[idx.reshape(-1).long().to(self.raw.device)])


QuantizedMatrix = Union[NativeMatrix, GGUFBlocks]


def from_gguf(raw: np.ndarray, type_name: str, in_features: int) -> QuantizedMatrix:
    """A native matrix where a kernel takes the type and its scales fit, else the file's blocks."""
    if type_name in NATIVE_TYPES:
        try:
            return NativeMatrix.from_blocks(raw, type_name, in_features)
        except ScaleOverflowError:
            pass
    return GGUFBlocks.from_blocks(raw, type_name, in_features)
