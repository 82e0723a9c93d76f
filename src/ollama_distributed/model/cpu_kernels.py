"""Our CPU kernels (kernels/cpu_kernels.cpp): the build on first use, and the 4-bit Linear's weight layout.

What is hand-written and why (measured on this project's 2-core AVX-512 machine, bench/README.md section 6):
  - q4_matmul: decode reads every weight once per token, and torch's CPU int4 kernel
    (`_weight_int4pack_mm_for_cpu`) converts each weight to float before multiplying, which caps it near 12 GB/s
    of weights per core; integer dot products (VPDPBUSD, as llama.cpp's Q4_1 x Q8_1) run about twice as fast.
    No library on PyPI exposes such a kernel for torch tensors.
  - rms_norm, rope_cache and attend_cached: torch runs RMSNorm as 6 ops, RoPE plus the cache writes as ~10, and
    decode attention through the flash kernel's setup (or a padded, masked call for a batch); at decode sizes
    their dispatch costs more than their arithmetic (~1 ms per SmolLM2 token each).
  - a thread pool that spins between calls (under OMP_WAIT_POLICY=PASSIVE, where OpenMP's threads sleep and every
    parallel region pays a wake-up; see the .cpp).

The extension is compiled with torch.utils.cpp_extension (g++ and ninja; ~20 s once, cached under
~/.cache/torch_extensions). Where the CPU lacks AVX-512 VNNI or the build fails, `ops()` is None and the model
keeps torch's ops; OLLAMA_DISTRIBUTED_CPU_KERNELS=0 forces that.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

GROUP = 32  # inputs per scale: GGUF's 4-bit block (the .cpp's kGroup; model/quant.py GROUP)
BLOCK_ROWS = 4  # rows per 512-bit load, one per 128-bit lane (the .cpp's kRows)
_SOURCE = Path(__file__).with_name("kernels") / "cpu_kernels.cpp"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c", "-fopenmp"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c")


def _cpu_supports() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in flags for flag in _CPU_FLAGS)


@lru_cache(maxsize=1)
def ops() -> ModuleType | None:
    """The compiled kernels (q4_matmul, rms_norm, rope_cache, attend_cached), or None where they cannot run
    here. Builds them on the first call."""
    if os.environ.get("OLLAMA_DISTRIBUTED_CPU_KERNELS", "1") == "0" or not _cpu_supports():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="ollama_distributed_cpu_kernels", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, an old assembler: keep torch's ops
        log.warning("CPU kernels unavailable (%s); using torch's ops", e)
        return None


def available() -> bool:
    """Whether the kernels run here (builds them on the first call)."""
    return ops() is not None


def fits(n: int, k: int) -> bool:
    """The shapes the kernel's layout takes: whole blocks of rows, whole groups of inputs."""
    return n % BLOCK_ROWS == 0 and k % GROUP == 0


class Q4Linear:
    """Y = X Wᵀ with W = d·q + m per row and group of 32 inputs (q 4-bit codes); X and Y float32.

    Built from the codes/scale/zero of a model/quant.py QuantMatrix (w = (q − 8)·scale + zero, so d = scale and
    m = zero − 8·scale: a Q4_1 file's own d and m, exact in float16)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        n, k = codes.shape
        assert fits(n, k), (n, k)
        self.out_features, self.in_features = n, k
        nb, ng = n // BLOCK_ROWS, k // GROUP
        q = codes.to(torch.uint8).view(nb, BLOCK_ROWS, ng, 2, 16)
        packed = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # (nb, 4, ng, 16): byte j = inputs j and 16 + j
        self.codes = packed.permute(0, 2, 1, 3).reshape(nb, ng, 64).contiguous()

        def per_block(t: torch.Tensor) -> torch.Tensor:
            return t.float().view(nb, BLOCK_ROWS, ng).permute(0, 2, 1).to(torch.float16).contiguous()

        self.d = per_block(scale)
        self.m = per_block(zero.float() - 8 * scale.float())
        self._mm = ops().q4_matmul  # type: ignore[union-attr]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32:
            x = x.float()
        if x.dim() != 2 or not x.is_contiguous():
            x = x.reshape(-1, self.in_features).contiguous()
        return self._mm(x, self.codes, self.d, self.m)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.d, self.m]
