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

  - qmatmul and dequant_rows (kernels/native_kernels.cpp): weights in their GGUF type (model/native.py).
  - DecodePlan: a whole decode step through a shard's layers in one call (model/fused_decode.py): with weights in
    their file's types the matmuls were ~2.3 ms of a ~8.5 ms SmolLM2 step and the ~15 torch ops and pybind calls
    per layer around them most of the rest.

The extension is compiled with torch.utils.cpp_extension (g++ and ninja; ~1 min once, cached under
~/.cache/torch_extensions). Where the CPU lacks AVX-512 VNNI or the build fails, `ops()` is None and the model
keeps torch's ops; OLLAMA_DISTRIBUTED_CPU_KERNELS=0 forces that. CPUs with AVX2, FMA and F16C but no AVX-512 (most
desktop and cloud x86) get qmatmul and dequant_rows from a second, smaller build: `native_ops()` returns whichever
fits this CPU (OLLAMA_DISTRIBUTED_CPU_ISA=avx2 forces the AVX2 one, for tests).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

GROUP = 32  # inputs per scale: GGUF's 4-bit block (the .cpp's kGroup; model/quant.py GROUP)
BLOCK_ROWS = 4  # rows per 512-bit load, one per 128-bit lane (the .cpp's kRows)
_KERNELS = Path(__file__).with_name("kernels")
_SOURCES = [str(_KERNELS / "cpu_kernels.cpp"), str(_KERNELS / "native_kernels.cpp")]  # both include common.h
# (-mamx-*: the batch kernel's AMX tiles, used only where the CPU has them: native_kernels.cpp amx_available)
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mamx-tile", "-mamx-int8",
          "-mfma", "-mf16c", "-fopenmp"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c")
# The AVX2 build: native_kernels.cpp alone, its own module (OD_NATIVE_MODULE), no AVX-512 instruction in it.
_AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-DOD_NATIVE_MODULE"]
_AVX2_CPU_FLAGS = ("avx2", "fma", "f16c")
ISAS = ("avx512", "avx2")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def _cpu_supports(required: tuple[str, ...] = _CPU_FLAGS) -> bool:
    flags = _cpu_flags()
    return all(flag in flags for flag in required)


def _disabled() -> bool:
    return os.environ.get("OLLAMA_DISTRIBUTED_CPU_KERNELS", "1") == "0"


@lru_cache(maxsize=1)
def ops() -> ModuleType | None:
    """The compiled kernels (q4_matmul, rms_norm, rope_cache, attend_cached), or None where they cannot run
    here. Builds them on the first call."""
    if _disabled() or not _cpu_supports():
        return None
    return _build("ollama_distributed_cpu_kernels", _SOURCES, _FLAGS)


@lru_cache(maxsize=1)
def _avx2_ops() -> ModuleType | None:
    if _disabled() or not _cpu_supports(_AVX2_CPU_FLAGS):
        return None
    return _build("ollama_distributed_avx2_kernels", _SOURCES[1:], _AVX2_FLAGS)


# One build at a time: a model loading while `build_in_background` compiles waits for that build instead of
# starting its own (lru_cache alone would let two threads compile the same module).
_BUILD_LOCK = threading.RLock()
_STALE_BUILD_S = 600


def _build(name: str, sources: list[str], flags: list[str]) -> ModuleType | None:
    with _BUILD_LOCK:
        return _build_locked(name, sources, flags)


def _build_locked(name: str, sources: list[str], flags: list[str]) -> ModuleType | None:
    # The name carries a digest of what is compiled: torch caches builds by name in one directory per user, so two
    # checkouts or installed versions with different sources would otherwise rebuild over each other's .so (and a
    # process could load the other's, missing functions).
    digest = hashlib.sha256(repr(flags).encode())
    for path in [*sources, str(_KERNELS / "common.h")]:
        digest.update(Path(path).read_bytes())
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        full_name = f"{name}_{digest.hexdigest()[:12]}"
        # torch's build baton is a lock file that a killed build leaves behind, and every later load then waits for
        # it forever; no build of ours takes 10 minutes, so an older one is stale.
        baton = Path(_get_build_directory(full_name, verbose=False)) / "lock"
        if baton.exists() and time.time() - baton.stat().st_mtime > _STALE_BUILD_S:
            log.warning("removing a stale build lock %s (a build was killed)", baton)
            baton.unlink(missing_ok=True)
        t0 = time.perf_counter()
        module = load(name=full_name, sources=sources, extra_cflags=flags,
                      extra_ldflags=["-fopenmp"], verbose=False)
        if time.perf_counter() - t0 > 2:  # compiled now, not loaded from the cache
            log.info("CPU kernels %s built in %.0f s (once per machine and version)", name, time.perf_counter() - t0)
        return module
    except Exception as e:  # no compiler, no ninja, an old assembler: keep torch's ops
        log.warning("CPU kernels %s unavailable (%s); using torch's ops", name, e)
        return None


@lru_cache(maxsize=1)
def native_ops() -> ModuleType | None:
    """The module with qmatmul and dequant_rows for this CPU (model/native.py): the AVX-512 VNNI build where the
    CPU has it, else the AVX2 build, else None (the portable torch path). Builds it on the first call.
    OLLAMA_DISTRIBUTED_CPU_ISA=avx512|avx2 picks one (falling back to the other, then None)."""
    if _disabled():
        return None
    isa = os.environ.get("OLLAMA_DISTRIBUTED_CPU_ISA", "")
    if isa and isa not in ISAS:
        log.warning("OLLAMA_DISTRIBUTED_CPU_ISA=%s: expected one of %s; choosing by the CPU", isa, "|".join(ISAS))
    if isa == "avx2":
        return _avx2_ops() or ops()
    return ops() or _avx2_ops()


def build_in_background() -> threading.Thread | None:
    """Compile (or load from the cache) this CPU's kernels in a daemon thread, so that a fresh install's compile
    overlaps start-up and model loading instead of following them; `serve` and `run` call it first thing. The
    first model load then waits only for what is left of the build (the builds hold _BUILD_LOCK). None where no
    kernels apply."""
    if _disabled() or not (_cpu_supports() or _cpu_supports(_AVX2_CPU_FLAGS)):
        return None

    def build() -> None:
        log.info("preparing CPU kernels (compiled on a machine's first run, ~20-60 s; cached after)")
        t0 = time.perf_counter()
        ready = native_ops() is not None
        ops()
        log.info("CPU kernels %s after %.1f s", "ready" if ready else "unavailable: torch's ops serve",
                 time.perf_counter() - t0)

    thread = threading.Thread(target=build, name="cpu-kernel-build", daemon=True)
    thread.start()
    return thread


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
