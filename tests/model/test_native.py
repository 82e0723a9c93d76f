"""Weights in their GGUF type (model/native.py) against gguf-py's dequantisers: the lossless repacking (dequantise
equal to gguf-py's exactly), the compiled kernels (AVX-512 VNNI and AVX2 builds, every tile and remainder: M = 1-5,
8, 16, 17, 33; N not a multiple of 4 or 16; AMX tiles for batches where the CPU has them) and the portable torch
path, column slicing on block boundaries, and the gguf-py fallback for the other types.

The AVX-512 build keeps activations in two int8 levels per group of 32 (~15 bits, kernels/common.h) and the AVX2
build in one int16 level (~16 bits): both are checked against the float32 matmul. An AVX-512 build with ggml's
numerics (-DOD_ACT_LEVELS=1: one int8 level, Q8_1's d = amax/127, ggml-quants.c quantize_row_q8_1_ref) is checked
against `ggml_matmul`, that integer scheme emulated in numpy, exact up to float32 accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants

from ollama_distributed.model import cpu_kernels, native
from ollama_distributed.model.native import NATIVE_TYPES, GGUFBlocks, NativeMatrix, from_gguf, slice_columns

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# byte offsets of each K-quant block's float16 scales (ggml-common.h block_q*_K)
F16_AT = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}


def gguf_rows(type_name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, bytes) valid blocks: gguf-py's quantiser where it has one, else random bytes with small finite scales."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[type_name]
    if type_name in LEGACY:
        return quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    size, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // size, nbytes), dtype=np.uint8)
    for at in F16_AT[type_name]:
        raw[..., at : at + 2] = (rng.random((n, k // size, 1)) * 0.01 + 1e-4).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def reference(raw: np.ndarray, type_name: str, n: int) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(n, -1))


def quantize_q8(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (M, K) -> int8 codes (M, G, 32), scales (M, G) and block_q8_1's sums s (M, G), as ggml's Q8_1
    (quantize_row_q8_1_ref: d = amax / 127, q = round(x / d), the float16 d stored, s = float16(d·Σq)) with the
    kernel's float32 operations and rounding to nearest even (common.h)."""
    xg = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    d = (np.abs(xg).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xg * inv[..., None]), -128, 127).astype(np.int64)
    s = (d * q.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float32)
    return q, d.astype(np.float16).astype(np.float32), s


def ggml_matmul(raw: np.ndarray, type_name: str, x: torch.Tensor) -> torch.Tensor:
    """x Wᵀ as the AVX-512 kernel computes it, in float64: per group of 32 (Q6_K: per 16) the exact integer dot product
    T of W's codes with x's Q8 codes, times d·sc (float32) and x's scale, minus dmin·m times Σ x's quantised values
    (Q4_1, Q5_1: block_q8_1's s, as ggml_vec_dot_q4_1_q8_1; common.h quantize_activations)."""
    n, k = raw.shape[0], x.shape[1]
    size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]
    qw, d, dmin, sc, m = native._unpack(raw.reshape(n, k // size, -1), type_name)
    g = k // 32
    qw = qw.reshape(n, g, 32).astype(np.int64)
    per = g // d.shape[1]  # groups per super-block
    dg = np.repeat(d.astype(np.float32), per, axis=1)
    ng = np.repeat(dmin.astype(np.float32), per, axis=1)
    qx, dx, s81 = quantize_q8(x)
    if type_name == "Q6_K":  # scales per 16 inputs: (n, G, 2)
        scale, offset = dg[..., None] * sc.astype(np.float32), ng[..., None] * m.astype(np.float32)
        t = np.einsum("mghk,nghk->mngh", qx.reshape(-1, g, 2, 16), qw.reshape(n, g, 2, 16))
        sx = dx[..., None] * qx.reshape(-1, g, 2, 16).sum(-1)  # (M, G, 2)
        y = (t * (scale[None].astype(np.float64) * dx[:, None, :, None])).sum((2, 3))
        y -= np.einsum("ngh,mgh->mn", offset.astype(np.float64), sx.astype(np.float32).astype(np.float64))
    else:
        scale, offset = (dg * sc.astype(np.float32), ng * m.astype(np.float32)) if sc is not None else (dg, ng)
        t = np.einsum("mgk,ngk->mng", qx, qw)
        sx = s81 if type_name in ("Q4_1", "Q5_1") else (dx * qx.sum(-1)).astype(np.float32)
        y = (t * (scale[None].astype(np.float64) * dx[:, None, :])).sum(2) - sx.astype(np.float64) @ offset.T
    return torch.from_numpy(y)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(params=["avx512", "avx2"])
def isa(request, monkeypatch):
    """The compiled kernels of one build, chosen as users would (OLLAMA_DISTRIBUTED_CPU_ISA)."""
    monkeypatch.setenv("OLLAMA_DISTRIBUTED_CPU_ISA", request.param)
    cpu_kernels.native_ops.cache_clear()
    ops = cpu_kernels.native_ops()
    want = {"avx512": "avx512_vnni", "avx2": "avx2"}[request.param]
    if ops is None or ops.native_isa != want:
        pytest.skip(f"no {request.param} build on this CPU")
    yield request.param
    cpu_kernels.native_ops.cache_clear()


@pytest.fixture
def portable(monkeypatch):
    """The torch path, as on a GPU or without a compiler."""
    monkeypatch.setenv("OLLAMA_DISTRIBUTED_CPU_KERNELS", "0")
    cpu_kernels.native_ops.cache_clear()
    assert cpu_kernels.native_ops() is None
    yield
    cpu_kernels.native_ops.cache_clear()


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_repacking_is_lossless(type_name):
    """dequantize() (torch ops) and dequantize_rows (the kernel build's, and torch's) give gguf-py's values exactly:
    every weight is (d·sc)·q − dmin·m with an exact product, the same rounding as gguf-py's."""
    n, k = 37, 512
    raw = gguf_rows(type_name, n, k)
    want = reference(raw, type_name, n)
    w = NativeMatrix.from_blocks(raw, type_name, k)
    assert (w.out_features, w.in_features, w.type_name) == (n, k, type_name)
    assert torch.equal(w.dequantize(), want)
    idx = torch.tensor([36, 0, 5, 5, 33])
    assert torch.equal(w.dequantize_rows(idx), want[idx])
    # memory follows the file: codes + bit planes + scales within 12 % of the file's bytes (N a multiple of 4)
    w8 = NativeMatrix.from_blocks(raw[:36], type_name, k)
    assert raw[:36].nbytes <= sum(t.nbytes for t in w8.tensors()) <= 1.12 * raw[:36].nbytes


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_kernel_matches_dequantised_matmul(type_name, isa):
    """M = 1 (4-block decode tiles and leftover blocks), 2-5, 8, 16, 17, 33 (tiles of 4 / 2 activation rows and
    their remainders; AMX chunks of 16 and a padded last chunk); N = 37, 70 (a padded last block, threads' ranges);
    one and several super-blocks. Each row's result is the same whatever M (prefill, decode and batches agree)."""
    g = torch.Generator().manual_seed(1)
    for n, k in [(37, 256), (70, 768)] + ([(5, 96)] if type_name in LEGACY else []):
        raw = gguf_rows(type_name, n, k, seed=n + k)
        w = NativeMatrix.from_blocks(raw, type_name, k)
        ref = reference(raw, type_name, n)
        for m in (1, 2, 3, 4, 5, 8, 16, 17, 33):
            x = torch.randn(m, k, generator=g)
            x[:, 7] *= 100  # an outlier channel, as LLM activations have
            got = w(x)
            assert got.shape == (m, n) and got.dtype == torch.float32 and got.is_contiguous()
            if getattr(cpu_kernels.native_ops(), "act_levels", 2) == 1:  # ggml's scheme, exact but for float32 sums
                assert rel_err(got, ggml_matmul(raw, type_name, x)) <= 2e-6, (n, k, m)
            else:  # ~15-16 bits per group of 32 (two int8 levels, or one int16 level): 2.1e-4 measured at worst
                assert rel_err(got, x.double() @ ref.double().T) <= 1e-3, (n, k, m)
            for i in {0, m // 2, m - 1}:
                assert torch.equal(w(x[i : i + 1]), got[i : i + 1]), (n, k, m, i)
        assert torch.equal(w.dequantize_rows(torch.tensor([n - 1, 1])), ref[[n - 1, 1]])


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_amx_tiles_equal_vnni_tiles(type_name, isa):
    """Batches on AMX tiles (CPUs with AMX-INT8) give the VPDPBUSD tiles' values bit for bit."""
    ops = cpu_kernels.native_ops()
    if isa != "avx512" or not ops.use_amx(True):
        pytest.skip("AMX tiles: the AVX-512 build on a CPU with AMX-INT8")
    raw = gguf_rows(type_name, 70, 768, seed=3)
    w = NativeMatrix.from_blocks(raw, type_name, 768)
    x = torch.randn(33, 768, generator=torch.Generator().manual_seed(2))
    x[:, 7] *= 100
    try:
        amx = w(x)
        ops.use_amx(False)
        assert torch.equal(amx, w(x))
    finally:
        ops.use_amx(True)


@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_portable_path_matches_dequantised_matmul(type_name, portable, monkeypatch):
    monkeypatch.setattr(native, "CHUNK", 4096)  # several row chunks (and a partial last one)
    raw = gguf_rows(type_name, 45, 256)
    w = NativeMatrix.from_blocks(raw, type_name, 256)
    ref = reference(raw, type_name, 45)
    for m in (1, 5):
        x = torch.randn(2, m, 256)  # leading dimensions are kept
        got = w(x)
        assert got.shape == (2, m, 45)
        assert rel_err(got, x @ ref.T) <= 1e-5
    assert torch.equal(w.dequantize_rows(torch.tensor([44, 3, 0])), ref[[44, 3, 0]])
    with pytest.raises(IndexError):
        w.dequantize_rows(torch.tensor([45]))


def test_moved_matrix_runs_the_portable_path():
    """to(device) moves every tensor; off the CPU only torch ops run (checked here on the meta device, which runs
    no kernel: shapes and dtypes only)."""
    w = NativeMatrix.from_blocks(gguf_rows("Q6_K", 9, 256), "Q6_K", 256)
    moved = w.to("meta")
    assert all(t.device.type == "meta" for t in moved.tensors()) and moved.m is moved.sc
    y = moved(torch.randn(3, 256, device="meta"))
    assert y.shape == (3, 9) and y.dtype == torch.float32
    assert moved.dequantize().shape == (9, 256)


@pytest.mark.parametrize("type_name, k, cols", [("Q4_0", 128, (32, 96)), ("Q8_0", 128, (0, 32)),
                                                 ("Q4_K", 768, (256, 768)), ("Q6_K", 768, (0, 512))])
def test_slice_columns_on_block_boundaries(type_name, k, cols):
    raw = gguf_rows(type_name, 11, k)
    part = slice_columns(raw, type_name, k, cols)
    w = NativeMatrix.from_blocks(part, type_name, cols[1] - cols[0])
    assert torch.equal(w.dequantize(), reference(raw, type_name, 11)[:, cols[0] : cols[1]])


def test_slice_columns_refuses_cuts_inside_a_block():
    raw = gguf_rows("Q4_K", 3, 512)
    for cols in [(0, 100), (32, 256), (0, 768), (256, 256)]:
        with pytest.raises(ValueError, match="whole blocks of 256"):
            slice_columns(raw, "Q4_K", 512, cols)
    with pytest.raises(ValueError, match="whole blocks of 32"):
        slice_columns(gguf_rows("Q4_0", 3, 64), "Q4_0", 64, (16, 64))


def test_from_blocks_rejects_what_it_cannot_hold():
    raw = gguf_rows("Q4_0", 4, 64)
    with pytest.raises(ValueError, match="bytes"):
        NativeMatrix.from_blocks(raw, "Q4_0", 96)
    with pytest.raises(ValueError, match="no native kernel"):
        NativeMatrix.from_blocks(gguf_rows("Q2_K", 4, 256), "Q2_K", 256)
    # Q8_0's dmin = 128·d overflows float16 beyond |d| = 511.75: kept as the file's blocks instead
    big = quants.quantize(np.full((4, 32), 1e5, np.float32), GGMLQuantizationType.Q8_0)
    with pytest.raises(native.ScaleOverflowError):
        NativeMatrix.from_blocks(big, "Q8_0", 32)
    assert isinstance(from_gguf(big, "Q8_0", 32), GGUFBlocks)
    assert isinstance(from_gguf(raw, "Q4_0", 64), NativeMatrix)


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K"])
def test_gguf_blocks_for_other_types(type_name, monkeypatch):
    monkeypatch.setattr(native, "CHUNK", 2048)  # several row chunks
    raw = gguf_rows(type_name, 19, 512)
    w = from_gguf(raw, type_name, 512)
    assert isinstance(w, GGUFBlocks) and w.out_features == 19 and w.tensors()[0].nbytes == raw.nbytes
    ref = reference(raw, type_name, 19)
    assert torch.equal(w.dequantize(), ref)
    assert torch.equal(w.dequantize_rows(torch.tensor([18, 2])), ref[[18, 2]])
    x = torch.randn(3, 512)
    assert rel_err(w(x), x @ ref.T) <= 1e-5


def test_block_inputs():
    assert native.BLOCK_INPUTS == {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
                                   "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
