"""What a weight format (`--dtype`) and a KV cache type mean, in one place.

Pure Python (no torch, numpy or gguf at import): the scheduler plans with it, the loader, engine and CLIs name
their choices with it. model/quant.py maps the same names to torch dtypes.

Weight formats (`WEIGHT_FORMATS`, `--dtype`):
  auto      every tensor kept in its file's own type (the default). GGUF: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K
            repacked losslessly for our kernels at about the file's bytes, F16/BF16/F32 as they are, other types as
            raw blocks; memory per tensor = its bytes in the file (`GGUFTensor.nbytes`). float32 residual stream.
  float32 / bfloat16 / float16   every tensor dequantised to that dtype, which is also the stream's.
  int4      our 4-bit groups of 32 for the layers (model/quant.py), a float16 + 4-bit output head, float32 stream.

KV cache types (`KV_CACHE_TYPES`, Ollama's `OLLAMA_KV_CACHE_TYPE`): f32 | f16 | q8_0 (ggml's block_q8_0: 32
int8 values and one f16 scale, 34 bytes per 32 elements). Which type a model's cache takes is
`kv_cache_type(weight_format, setting)`: a setting wins; without one, f16 for `auto` (as Ollama), the compute
dtype for float32/bfloat16/float16, f32 for int4 (its attention runs in float32).

GGUF tensor types (`GGUF_TYPE_SIZES`): (elements, bytes) per block, gguf-py's GGML_QUANT_SIZES (ggml-common.h block
structs; tests check the two agree). A row-parallel cut (ffn_down, attn_output by input columns) must fall on the
type's block grid — 32 inputs for the legacy types, 256 for K-quants — for a shard to read only its own blocks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

# ---- weight formats ----------------------------------------------------------------------------------------------

WEIGHT_FORMATS = ("auto", "float32", "bfloat16", "float16", "int4")
DEFAULT_WEIGHT_FORMAT = "auto"


@dataclass(frozen=True)
class WeightFormat:
    """What one `--dtype` means for loading and for planning.

    name: the `--dtype` name. compute_dtype: torch dtype name of the residual stream and activations.
    quant: the loader's mode (model/weights.py load_weights): None = dense in compute_dtype, "int4", or "native"
      (the file's own types). weight_bytes: bytes per layer weight element; None = each tensor's file type.
    matrix_bytes: bytes per embedding / output-head element where they differ from weight_bytes (None = same).
    stream_bytes: bytes per activation element sent between pipeline stages and all-reduced.
    default_kv: KV cache element type when no KV cache type is set (see kv_cache_type).
    block: inputs per quantisation block that row-parallel cuts must respect (1 = any column; None = the file's
      types, read per tensor).
    """

    name: str
    compute_dtype: str
    quant: str | None
    weight_bytes: float | None
    matrix_bytes: float | None
    stream_bytes: float
    default_kv: str
    block: int | None


# int4 (model/quant.py): 4-bit codes + a bf16 scale and zero per 32 weights = 0.5 + 4/32 bytes; the head ranks with
# 4-bit rows (0.625 B) and refines from a float16 table (2 B), which a tied embedding shares.
_INT4_BYTES = 0.5 + 4 / 32
FORMATS: dict[str, WeightFormat] = {
    "auto": WeightFormat("auto", "float32", "native", None, None, 4.0, "f16", None),
    "float32": WeightFormat("float32", "float32", None, 4.0, None, 4.0, "f32", 1),
    "bfloat16": WeightFormat("bfloat16", "bfloat16", None, 2.0, None, 2.0, "bf16", 1),
    "float16": WeightFormat("float16", "float16", None, 2.0, None, 2.0, "f16", 1),
    "int4": WeightFormat("int4", "float32", "int4", _INT4_BYTES, _INT4_BYTES + 2.0, 4.0, "f32", 32),
}
assert tuple(FORMATS) == WEIGHT_FORMATS


def weight_format_info(name: str) -> WeightFormat:
    """The WeightFormat of a `--dtype` name; ValueError naming the choices otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: expected {'|'.join(WEIGHT_FORMATS)}") from None


def weight_format_name(compute_dtype: str, quant: str | None = None) -> str:
    """The `--dtype` name of what a shard holds: (torch dtype name such as "float32" or "torch.float32", loader
    quant mode). The inverse of (WeightFormat.compute_dtype, WeightFormat.quant)."""
    dtype = compute_dtype.removeprefix("torch.")
    for f in FORMATS.values():
        if f.quant == quant and (quant is not None or f.compute_dtype == dtype):
            return f.name
    raise ValueError(f"no weight format computes in {dtype} with quant={quant!r}; formats: {'|'.join(WEIGHT_FORMATS)}")


# ---- KV cache ----------------------------------------------------------------------------------------------------

KV_CACHE_TYPES = ("f32", "f16", "q8_0")
DEFAULT_KV_CACHE_TYPE = "f16"
KV_CACHE_ENV = "OLLAMA_KV_CACHE_TYPE"
# Bytes per cached element. bf16 is not a setting: it is the cache of the bfloat16 format when none is set.
KV_ELEMENT_BYTES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


def check_kv_cache_type(name: str) -> str:
    """`name` as a KV cache type (case and surrounding spaces ignored); ValueError naming the choices."""
    kv = name.strip().lower()
    if kv not in KV_CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {name!r} ({KV_CACHE_ENV} / --kv-cache-type): expected "
                         f"{'|'.join(KV_CACHE_TYPES)}")
    return kv


def kv_cache_type_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The KV cache type set by OLLAMA_KV_CACHE_TYPE, or None when unset or empty (Ollama treats both as its
    default); ValueError naming the choices for anything else. For the CLI / settings edge only."""
    value = (os.environ if environ is None else environ).get(KV_CACHE_ENV, "")
    return check_kv_cache_type(value) if value.strip() else None


def kv_cache_type(weight_format: str, setting: str | None = None) -> str:
    """The element type a model's KV cache is held in: `setting` (a KV_CACHE_TYPES name, from --kv-cache-type or
    OLLAMA_KV_CACHE_TYPE) when given, for every weight format; otherwise f16 for auto (Ollama's default), the
    compute dtype for float32 / bfloat16 / float16 ("f32" / "bf16" / "f16"), and f32 for int4. The engine and the
    planner both call this, so a plan counts the cache the shards will hold."""
    fmt = weight_format_info(weight_format)
    return check_kv_cache_type(setting) if setting is not None else fmt.default_kv


def kv_bytes_per_element(kv_type: str) -> float:
    """Bytes per cached K or V element of a kv_cache_type() result (f32 4, f16/bf16 2, q8_0 34/32)."""
    try:
        return KV_ELEMENT_BYTES[kv_type]
    except KeyError:
        raise ValueError(f"unknown KV cache element type {kv_type!r}: expected {'|'.join(KV_ELEMENT_BYTES)}") from None


# ---- GGUF tensor types -------------------------------------------------------------------------------------------

LEGACY_BLOCK = 32  # QK4_0 .. QK8_0 in ggml-common.h
K_BLOCK = 256  # QK_K: the K-quants' super-block

# type name → (elements per block, bytes per block): gguf-py gguf/constants.py GGML_QUANT_SIZES (from ggml-common.h)
GGUF_TYPE_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "F64": (1, 8),
    "I8": (1, 1), "I16": (1, 2), "I32": (1, 4), "I64": (1, 8),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q8_1": (32, 40),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "Q8_K": (256, 292),
    "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ3_XXS": (256, 98), "IQ1_S": (256, 50), "IQ4_NL": (32, 18),
    "IQ3_S": (256, 110), "IQ2_S": (256, 82), "IQ4_XS": (256, 136), "IQ1_M": (256, 56),
    "TQ1_0": (256, 54), "TQ2_0": (256, 66), "MXFP4": (32, 17),
}


def gguf_type_size(type_name: str) -> tuple[int, int]:
    """(elements, bytes) per block of a GGUF tensor type, by name ("Q4_K" or "q4_k"); types newer than this
    table are looked up in the installed gguf package."""
    key = type_name.upper()
    size = GGUF_TYPE_SIZES.get(key)
    if size is not None:
        return size
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        return tuple(GGML_QUANT_SIZES[GGMLQuantizationType[key]])  # type: ignore[return-value]
    except (ImportError, KeyError):
        raise ValueError(f"unknown GGUF tensor type {type_name!r}") from None


def bytes_per_element(type_name: str) -> float:
    """Block bytes / block elements of a GGUF tensor type (Q4_K: 144/256 = 0.5625)."""
    elems, nbytes = gguf_type_size(type_name)
    return nbytes / elems


def block_size(type_name: str) -> int:
    """Inputs per block of a GGUF tensor type: 1 for float/int types, 32 legacy quants, 256 K-quants."""
    return gguf_type_size(type_name)[0]


def tensor_nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of `shape` (GGUF order: shape[0] = the row length, a whole number of blocks)."""
    elems, nbytes = gguf_type_size(type_name)
    n = math.prod(int(s) for s in shape)
    return n * nbytes // elems


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file's header: its type name and shape in GGUF order (shape[0] = inputs per row)."""

    name: str
    type_name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.type_name, self.shape)

    @property
    def block(self) -> int:
        return block_size(self.type_name)


def read_gguf_tensors(path: str | Path) -> dict[str, GGUFTensor]:
    """Every tensor's type and shape from a GGUF file's header (model/gguf_index.py; no tensor data is read)."""
    from .gguf_index import GGUFIndex, NotHandled

    try:
        tensors = GGUFIndex(path).tensors
    except NotHandled:  # byte-swapped files and nested arrays: gguf's own reader
        import gguf

        tensors = gguf.GGUFReader(path).tensors
    return {t.name: GGUFTensor(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in tensors}


# HF config.json `torch_dtype` → the GGUF type name of the same element format (for `auto` on safetensors)
HF_DTYPE_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def hf_tensor_type(directory: str | Path) -> str:
    """The GGUF type name of an HF model directory's weights under `auto` (they stay in the checkpoint's own
    dtype): config.json's `torch_dtype`, bfloat16 when it names none."""
    import json

    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    return HF_DTYPE_TYPES.get(str(config.get("torch_dtype") or "bfloat16"), "BF16")


# ---- presets: Ollama's default download ----------------------------------------------------------------------------

# A model known only by its hyper-parameters (a preset) counts as Q4_K_M, what `ollama pull` fetches by default.
# llama.cpp's quantize tool lists Q4_K_M as "3.80G, +0.0532 ppl @ LLaMA-v1-7B" (tools/quantize/quantize.cpp,
# QUANT_OPTIONS; G = GiB): 3.80 GiB over LLaMA-7B's 6,738,415,616 weights is 4.84 bits per weight, averaged over
# all tensors (Q4_K mostly, Q6_K for the output head and half of the attn_v / ffn_down layers, F32 norms).
Q4_K_M_BITS_PER_WEIGHT = 3.80 * 2**30 * 8 / 6_738_415_616


def q4_k_m_block(row_length: int) -> int:
    """Block of a Q4_K_M tensor with rows of `row_length` inputs: K-quants (256) where the row is a whole number of
    super-blocks, else llama.cpp's legacy fallback (Q5_0 / Q8_0, 32): llama-quant.cpp's `n_fallback` path."""
    return K_BLOCK if row_length % K_BLOCK == 0 else LEGACY_BLOCK


def lcm_blocks(blocks: Sequence[int]) -> int:
    """The coarsest grid every block of `blocks` lies on (1 for none)."""
    return math.lcm(*blocks) if blocks else 1
