"""Weights on 2 MiB pages: the native kernels' codes and scales are copied into anonymous mappings marked
MADV_HUGEPAGE, so streaming a model's weights every decode step walks ~45 page-table entries per 90 MB instead
of ~22,000.

Why: decode reads every weight once per token, mostly from DRAM; with 4 KiB pages each 4 KiB of weights costs a
TLB miss and a page walk, which the hardware prefetchers do not cross. Linux backs an anonymous mapping with
transparent huge pages when asked (madvise(2) MADV_HUGEPAGE; the kernel's THP mode is often `madvise`, which
grants them to nothing else). Measured on SmolLM2 Q4_1 (bench/README.md): one sequence's decode 151–175 →
186–196 tok/s in process; the 28 MB Q8_0 head alone 1.16 → 1.13 ms.

How: a bump allocator over 32 MiB chunks (one mapping each, aligned to 2 MiB; allocations 64-byte aligned, as
torch's CPU allocator, for the kernels' 64-byte loads). Tensors are views of their chunk, and the chunk is
unmapped when its last tensor goes (the allocator holds it only weakly), so an unloaded model returns its memory
(where two models' tensors share a chunk, it goes with the last of them: at most one chunk held longer).
Untouched pages of a chunk are never resident; the resident waste is at most one 2 MiB page per chunk.
Arrays under 64 KiB, platforms without MADV_HUGEPAGE, and OLLAMA_DISTRIBUTED_HUGEPAGES=0 keep torch's allocator.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref

import numpy as np
import torch

HUGE = 2 << 20
CHUNK = 32 << 20
MIN_BYTES = 64 << 10  # smaller arrays share their pages with other data anyway
_ALIGN = 64


def enabled() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("OLLAMA_DISTRIBUTED_HUGEPAGES", "1") != "0"


class _Arena:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # the current chunk's whole mapping, weakly: views of it (numpy collapses a view's base to this array)
        # keep it alive, and with them gone it is unmapped
        self._chunk: weakref.ref[np.ndarray] | None = None
        self._off = self._end = 0

    def alloc(self, nbytes: int) -> np.ndarray:
        """`nbytes` uint8 on huge pages (a view that keeps its chunk mapped)."""
        with self._lock:
            whole = self._chunk() if self._chunk is not None else None
            if whole is None or self._off + nbytes > self._end:
                size = max(CHUNK, -(-nbytes // HUGE) * HUGE)
                mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                whole = np.frombuffer(mm, dtype=np.uint8)  # (holds the mapping until no view of it is left)
                start = -whole.ctypes.data % HUGE  # a multiple of the 4 KiB page the mapping starts on
                try:
                    mm.madvise(mmap.MADV_HUGEPAGE, start, size)
                except OSError:  # a kernel without transparent huge pages: 4 KiB pages, as torch's would be
                    pass
                self._chunk, self._off, self._end = weakref.ref(whole), start, start + size
            out = whole[self._off : self._off + nbytes]
            self._off += -(-nbytes // _ALIGN) * _ALIGN
            return out


_arena = _Arena()


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A contiguous copy of `a` as a torch tensor, on huge pages where that applies (see the module doc)."""
    if a.nbytes < MIN_BYTES or not enabled():
        return torch.from_numpy(a).clone(memory_format=torch.contiguous_format)  # one copy, strided or not
    dst = _arena.alloc(a.nbytes).view(a.dtype).reshape(a.shape)
    np.copyto(dst, a)
    return torch.from_numpy(dst)
