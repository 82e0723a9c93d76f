"""`linear` for every kind of weight a shard holds: dense tensors and the quantised ones (callables with
`tensors()`: model/quant.py's int4 forms, model/native.py's file-format blocks, model/file_format.Stacked)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for every kind of weight: dense ones of the stream's dtype, dense ones kept in the file's
    F16/BF16 (x converted to it, the result back to x's dtype), and quantised ones (callables)."""
    if isinstance(w, torch.Tensor):
        if w.dtype is x.dtype:
            return F.linear(x, w, bias)
        y = F.linear(x.to(w.dtype), w).to(x.dtype)
    else:
        y = w(x)
    return y if bias is None else y + bias


def weight_tensors(w: Any | None) -> list[torch.Tensor]:
    """The tensors holding `w`'s bytes (for memory accounting)."""
    if w is None:
        return []
    return [w] if isinstance(w, torch.Tensor) else w.tensors()
