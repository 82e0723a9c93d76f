"""model/hugepages.py: weights copied onto MADV_HUGEPAGE mappings keep their values and alignment, the mapping
carries the kernel's huge-page flag, goes away with its last tensor, and the switch turns it all off."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from ollama_distributed.model import hugepages

def _thp() -> bool:
    try:
        return "[never]" not in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not (hugepages.enabled() and _thp()), reason="no transparent huge pages here")


def _vma_flags(addr: int) -> list[str]:
    """VmFlags of the mapping of this process that holds `addr` (proc(5) smaps; "hg": madvised MADV_HUGEPAGE)."""
    lines = open("/proc/self/smaps").read().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_copies_are_exact_aligned_and_on_madvised_pages() -> None:
    a = np.arange(300_000, dtype=np.int32).reshape(600, 500)
    strided = a[:, ::2]  # not contiguous: copied into a contiguous tensor
    t, u = hugepages.to_torch(a), hugepages.to_torch(strided)
    assert torch.equal(t, torch.from_numpy(a)) and torch.equal(u, torch.from_numpy(np.ascontiguousarray(strided)))
    assert t.is_contiguous() and u.is_contiguous()
    assert t.data_ptr() % 64 == 0 and u.data_ptr() % 64 == 0  # the kernels' 64-byte loads
    assert "hg" in _vma_flags(t.data_ptr()) and "hg" in _vma_flags(u.data_ptr())
    before = hugepages._arena._off
    hugepages.to_torch(np.ones(16, np.float32))  # under MIN_BYTES: torch's allocator, not the arena
    assert hugepages._arena._off == before


def test_a_mapping_goes_with_its_last_tensor() -> None:
    # larger than a chunk: a mapping of its own, which no other test's tensors share
    t = hugepages.to_torch(np.ones(hugepages.CHUNK + 1, np.uint8))
    assert hugepages._arena._chunk() is not None
    del t
    gc.collect()
    assert hugepages._arena._chunk() is None  # unmapped: an unloaded model gives its memory back


def test_switched_off(monkeypatch) -> None:
    # (torch's own memory may still sit in a madvised region: numpy madvises its large heap allocations too, so
    # the check is that the arena was not used)
    monkeypatch.setenv("OLLAMA_DISTRIBUTED_HUGEPAGES", "0")
    before = (hugepages._arena._chunk, hugepages._arena._off)
    t = hugepages.to_torch(np.ones(1 << 20, np.uint8))
    assert torch.equal(t, torch.ones(1 << 20, dtype=torch.uint8))
    assert (hugepages._arena._chunk, hugepages._arena._off) == before
