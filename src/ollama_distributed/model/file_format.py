"""Weights kept in the model file's own types (`--dtype auto`, the default): what the loader hands a shard and how the
shard turns it into a weight its kernels run.

The loader (model/weights.py) returns each matrix as `GGUFRows`: the file's bytes for the rows this shard owns
(already sliced to its columns on whole quantisation blocks), not decoded. The shard may permute rows (llama's
q/k RoPE order) and stack same-typed matrices (fused q/k/v, gate/up) on those bytes, then `pack` makes the weight:
  - Q4_0 … Q6_K (model/native.py NATIVE_TYPES): a `NativeMatrix`, the blocks repacked losslessly for our kernels;
  - F32 / F16 / BF16: the plain tensor, computed in its own precision as ggml does (its F16/BF16 matmuls convert
    the activations to the weight's type: ggml-cpu's type_traits vec_dot_type);
  - every other gguf type (Q2_K, Q3_K, IQ*, …): `GGUFBlocks`, dequantised a row chunk at a time per call, so the
    whole model is never held as floats.
Matrices whose types differ cannot share one GEMM (a Q4_K_M file has Q4_K q/k and a Q6_K v in some layers); they run
as `Stacked` parts whose outputs are concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .linear import linear, weight_tensors

# File types kept as torch tensors, and their torch dtype
DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class GGUFRows:
    """Rows of one GGUF tensor in the file's bytes: raw (rows, bytes per row) uint8, `in_features` inputs each."""

    raw: np.ndarray
    type_name: str
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.raw.shape[0], self.in_features)

    def map_rows(self, fn: Callable[[np.ndarray], np.ndarray]) -> "GGUFRows":
        """The same rows reordered or selected by `fn` (rows never share bytes: every block lies within a row)."""
        return GGUFRows(fn(self.raw), self.type_name, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 values (tests, and shapes no kernel takes)."""
        import gguf

        values = gguf.quants.dequantize(self.raw, gguf.GGMLQuantizationType[self.type_name])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(self.shape)


class Stacked:
    """Output-row concatenation of weights that cannot be one matrix (different file types)."""

    def __init__(self, parts: list["Weight"]) -> None:
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts)
        self.in_features = parts[0].in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([linear(x, p) for p in self.parts], dim=-1)

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in weight_tensors(p)]


Weight = Any  # torch.Tensor | native.NativeMatrix | native.GGUFBlocks | Stacked


def pack(rows: GGUFRows) -> Weight:
    """The weight a shard keeps for `rows` (see the module docstring)."""
    from .native import from_gguf

    dense = DENSE_TYPES.get(rows.type_name)
    if dense is not None:
        return torch.from_numpy(np.array(rows.raw)).view(dense).view(rows.shape)  # (a copy: the file is read-only)
    # NativeMatrix where a kernel takes the type (and its derived scales fit float16), else the file's blocks
    return from_gguf(np.ascontiguousarray(rows.raw), rows.type_name, rows.in_features)


def pack_stacked(parts: list[GGUFRows]) -> Weight:
    """One weight for the output-row concatenation of `parts`: one matrix where they share a type, else `Stacked`."""
    if len(parts) == 1:
        return pack(parts[0])
    if len({p.type_name for p in parts}) == 1:
        return pack(GGUFRows(np.concatenate([p.raw for p in parts]), parts[0].type_name, parts[0].in_features))
    # adjacent parts of one type still share a matrix (q and k are both Q4_K where v is Q6_K)
    groups: list[list[GGUFRows]] = []
    for p in parts:
        if groups and groups[-1][0].type_name == p.type_name:
            groups[-1].append(p)
        else:
            groups.append([p])
    return Stacked([pack_stacked(g) for g in groups])


def lookup(table: Weight, ids: torch.Tensor) -> torch.Tensor:
    """Embedding rows `ids` of `table` as float32."""
    if isinstance(table, torch.Tensor):
        return F.embedding(ids, table).float()
    return table.dequantize_rows(ids)
