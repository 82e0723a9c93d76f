"""Model files → `ModelConfig` and the tensors one shard owns.

GGUF is read through `gguf.GGUFReader`, which memory-maps the file: a shard touches (and so pays RSS for) only
the bytes of the rows it dequantises. Column-parallel weights (q/k/v, gate/up, embedding, lm_head) are split by
output rows, and quantised blocks never straddle a row, so rows are selected *before* dequantising.
Row-parallel weights (o, down) are split by input columns, which may cut through a quantisation block, so they
are dequantised in bounded row chunks and the columns sliced from each chunk.

HF directories (config.json + safetensors) are delegated to `model/hf.py`, which returns the same canonical names.

Canonical names and layouts are fixed in /work/notes/contracts.md ("model/weights.py").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from .errors import ModelFileError, UnsupportedArchitectureError
from .file_format import GGUFRows
from .moe import holds_shared_expert, load_moe_layer, load_shared_expert
from .native import slice_columns
from .quant import GROUP, QUANT_FORMATS, QuantMatrix, from_gguf_blocks, quantize_rtn
from .shard import ShardSpec

log = logging.getLogger(__name__)

# GGUF `general.architecture` → our arch. llama.cpp writes Mistral (v0.1-v0.3) checkpoints as "llama"; older
# conversions used "mistral" with the same tensor layout (convert_hf_to_gguf.py: MistralModel(LlamaModel)).
_ARCH_ALIASES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3",
                 "phi3": "phi3", "qwen3moe": "qwen3moe",
                 "qwen2moe": "qwen2moe"}
_GGUF_ARCHS = tuple(_ARCH_ALIASES)
# Dequantise at most this many elements at once (float32 temporaries ≈ 4 × this many bytes).
_CHUNK_ELEMS = 1 << 22
# Byte offsets of the float16 scales in one block of each quantised type (ggml-common.h block structs), checked for
# NaN/inf when a shard keeps the file's blocks: a cheap test for garbage bytes, where dequantising would not be.
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                  "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


class _Truncated(Exception):
    def __init__(self, end: int, size: int, in_data: bool) -> None:
        super().__init__(end, size, in_data)
        self.end, self.size, self.in_data = end, size, in_data


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that notices reads past the end of the file.

    The upstream reader slices its memmap, and a slice past the end silently comes back short, surfacing later
    as an unrelated numpy reshape error; checking the extent here lets us say "truncated" with byte counts.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        end = int(offset) + int(count) * np.dtype(dtype).itemsize
        if end > len(self.data):
            in_data = getattr(self, "data_offset", None) is not None and offset >= self.data_offset
            raise _Truncated(end, len(self.data), in_data)
        return super()._get(offset, dtype, count, *args, **kwargs)


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    del mtime_ns  # part of the cache key only: a rewritten file is parsed again
    from .gguf_index import GGUFIndex, NotHandled, Truncated

    try:
        try:
            # The fast header parser (~20 ms; GGUFReader takes ~2 s on a 49k-token vocabulary, paid by every
            # shard worker the runtime starts). It exposes the fields/tensors interface used here.
            return GGUFIndex(path)  # type: ignore[return-value]
        except NotHandled:  # byte-swapped files, nested arrays
            return _CheckedReader(path)
    except (_Truncated, Truncated) as exc:
        if exc.in_data:
            problem = f"truncated: tensor data runs to byte {exc.end} but the file has {exc.size} bytes"
        else:
            problem = f"truncated or corrupt header: it needs byte {exc.end} but the file has {exc.size} bytes"
        raise ModelFileError(path, problem) from None
    except Exception as exc:  # noqa: BLE001 — any failure to parse untrusted bytes means a corrupt file
        raise ModelFileError(path, f"corrupt GGUF header ({type(exc).__name__}: {exc})") from None


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A parsed (memory-mapped, cached) GGUF reader, or ModelFileError naming the file and the problem."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(p, "file does not exist")
    if p.is_dir():
        raise ModelFileError(p, "is a directory without config.json, not a GGUF file or HF model directory")
    st = p.stat()
    with open(p, "rb") as f:
        magic = f.read(4)
    if len(magic) < 4:
        raise ModelFileError(p, f"truncated: {st.st_size} bytes is too short to be a GGUF file")
    if magic != b"GGUF":
        raise ModelFileError(p, f"not a GGUF file: magic {magic!r}, expected b'GGUF'")
    return _open_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def _field_value(path: Path, field: Any) -> Any:
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ModelFileError(path, f"corrupt metadata field {field.name!r} ({exc})") from None


def drop_file_pages(path: str | Path) -> None:
    """Take the file pages a load touched out of this process's resident set once the shard holds its own copy.

    The reader memory-maps the file, and every page a shard's rows were read from stays mapped (and counted in
    RSS) for as long as the cached reader lives, though the shard no longer reads them: without this a native
    shard's RSS is its packed weights plus the file. MADV_DONTNEED on this clean, read-only mapping only drops the
    page-table entries; the pages stay in the page cache and a later read faults them back in."""
    import mmap

    p = Path(path)
    if _is_hf_dir(p) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    backing = getattr(open_gguf(p).data, "_mmap", None)  # np.memmap's mmap object
    if backing is not None:
        backing.madvise(mmap.MADV_DONTNEED)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every GGUF key/value field as plain Python values (token/merge arrays included as lists)."""
    p = Path(path)
    reader = open_gguf(p)
    return {name: _field_value(p, field) for name, field in reader.fields.items()}


_REQUIRED = object()


def _uniform(path: Path, key: str, value: Any) -> Any:
    """Some GGUFs store per-layer arrays (e.g. head_count_kv); we support only one value for all layers."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise ModelFileError(path, f"{key} varies per layer ({value}); only uniform layers are supported")
        return value[0]
    return value


def read_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a GGUF file, or of an HF directory (config.json; delegated to model/hf.py)."""
    p = Path(path)
    if _is_hf_dir(p):
        from .hf import read_hf_config  # lazy: the HF reader is optional for GGUF-only use

        return read_hf_config(p)
    reader = open_gguf(p)
    fields = reader.fields

    def get(key: str, default: Any = _REQUIRED) -> Any:
        field = fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ModelFileError(p, f"metadata key {key!r} is missing")
            return default
        return _uniform(p, key, _field_value(p, field))

    gguf_arch = str(get("general.architecture"))
    arch = _ARCH_ALIASES.get(gguf_arch)
    if arch is None:
        raise UnsupportedArchitectureError(p, gguf_arch, _GGUF_ARCHS)
    assert arch in SUPPORTED_ARCHITECTURES
    a = gguf_arch
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelFileError(p, "tensor 'token_embd.weight' is missing")
    # GGUF dims are listed fastest-varying first: token_embd is [hidden, vocab].
    embd_hidden, embd_vocab = (int(d) for d in tensors["token_embd.weight"].shape[:2])
    n_heads = int(get(f"{a}.attention.head_count"))
    try:
        cfg = ModelConfig(
            arch=arch,
            n_layers=int(get(f"{a}.block_count")),
            hidden_size=int(get(f"{a}.embedding_length")),
            n_heads=n_heads,
            n_kv_heads=int(get(f"{a}.attention.head_count_kv", n_heads)),
            ffn_size=int(get(f"{a}.feed_forward_length")),
            vocab_size=embd_vocab,
            context_length=int(get(f"{a}.context_length", 2048)),
            rope_theta=float(get(f"{a}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            # transformers' GGUF loader ties exactly when the file has no separate output head.
            tie_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            head_dim=int(get(f"{a}.attention.key_length", 0)),
            rope_scaling=_rope_scaling(p, get, a, reader),
            name=str(get("general.name", "")),
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            **_family_fields(p, get, a, fields, tensors),
        )
        if int(get(f"{a}.expert_count", 0)):  # mixture of experts: the FFN width is one expert's (model/moe.py)
            cfg = dataclasses.replace(
                cfg, ffn_size=int(get(f"{a}.expert_feed_forward_length")), n_expert=int(get(f"{a}.expert_count")),
                n_expert_used=int(get(f"{a}.expert_used_count")),
                # llama.cpp's qwen2moe graph keeps the top-k softmax weights as they are (no renormalising)
                norm_topk_prob=a != "qwen2moe",
                shared_expert_ffn=int(get(f"{a}.expert_shared_feed_forward_length", 0)))
    except ValueError as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(p, f"inconsistent model metadata: {exc}") from None
    if embd_hidden != cfg.hidden_size:
        raise ModelFileError(p, f"token_embd.weight is {embd_hidden} wide but embedding_length is {cfg.hidden_size}")
    return cfg


def _family_fields(p: Path, get: Any, a: str, fields: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields beyond the Llama block that a family's GGUF implies (keys as llama.cpp writes them)."""
    if a == "phi3":
        # (Phi-3's LongRoPE files, 128k, carry per-frequency factor tensors: read by _rope_scaling.)
        rot = int(get(f"{a}.rope.dimension_count", 0))
        n_embd_head = int(get(f"{a}.embedding_length")) // int(get(f"{a}.attention.head_count"))
        if rot and rot != int(get(f"{a}.attention.key_length", n_embd_head)):
            raise ModelFileError(p, f"partial rotary embeddings (rope.dimension_count {rot}) are not supported")
        # ({a}.attention.sliding_window, when present, is not applied: transformers' GGUF loader ignores it too.)
        return {}
    if a not in ("gemma2", "gemma3"):
        return {}
    hidden, n_heads = int(get(f"{a}.embedding_length")), int(get(f"{a}.attention.head_count"))
    head_dim = int(get(f"{a}.attention.key_length", hidden // n_heads))
    # Query scaling: HF's query_pre_attn_scalar is head_dim for every Gemma 2/3 but the 27Bs (46 / 62 layers), where
    # it is hidden / heads (144 / 168); llama.cpp decides the same way (llama-model.cpp, f_attention_scale).
    scalar = hidden // n_heads if int(get(f"{a}.block_count")) == {"gemma2": 46, "gemma3": 62}[a] else head_dim
    scale = float(get(f"{a}.attention.scale", scalar ** -0.5))
    pattern_field = fields.get(f"{a}.attention.sliding_window_pattern")
    # llama.cpp's hparams.set_swa_pattern(2 | 6), transformers' default layer_types for Gemma2 / Gemma3
    pattern = 2 if a == "gemma2" else 6
    if pattern_field is not None:
        value = _field_value(p, pattern_field)
        if isinstance(value, list):  # per-layer flags (True = sliding): must repeat a "(k-1) sliding, 1 global" cycle
            pattern = value.index(False) + 1 if False in value else len(value) + 1
            if any(bool(v) != ((i + 1) % pattern != 0) for i, v in enumerate(value)):
                raise ModelFileError(p, f"sliding_window_pattern {value} is not a periodic pattern")
        else:
            pattern = int(value)
    return dict(
        post_norms=True,
        activation="gelu_tanh",
        # transformers' Gemma3TextScaledWordEmbedding: embeddings * sqrt(hidden) (a float32 scalar here)
        embed_scale=float(np.float32(hidden ** 0.5)),
        attention_scale=scale,
        sliding_window=int(get(f"{a}.attention.sliding_window", 0)),
        sliding_window_pattern=pattern,
        # gemma2 rotates every layer with rope.freq_base; gemma3's local layers with 10000
        rope_local_theta=float(get(f"{a}.rope.freq_base_swa", 10000.0)) if a == "gemma3" else 0.0,
        attn_softcap=float(get(f"{a}.attn_logit_softcapping", 0.0)),
        final_softcap=float(get(f"{a}.final_logit_softcapping", 0.0)),
    )


def _rope_scaling(p: Path, get: Any, a: str, reader: gguf.GGUFReader) -> RopeScaling:
    """RoPE scaling from `{arch}.rope.scaling.*` (llama.cpp's keys) or a llama3 `rope_freqs.weight` tensor.

    llama.cpp's converter stores Llama-3.1/3.2 scaling not as metadata but as per-frequency divisors in the
    `rope_freqs.weight` tensor (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors). The engine applies
    that tensor exactly (load_weights returns it as "rope_freqs"); the config records kind "llama3" with the
    largest divisor as `factor`, for display and planning only.
    """
    kind = str(get(f"{a}.rope.scaling.type", "none"))
    factor = float(get(f"{a}.rope.scaling.factor", 1.0))
    if kind == "none" and (linear := get(f"{a}.rope.scale_linear", None)) is not None:  # pre-2024 key
        kind, factor = "linear", float(linear)
    orig = int(get(f"{a}.rope.scaling.original_context_length", 8192))
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    factors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if factors:
        return _longrope(p, get, a, factors)
    if freqs is not None and kind == "none":
        return RopeScaling("llama3", float(np.max(gguf.quants.dequantize(freqs.data, freqs.tensor_type))), 1.0, 4.0, orig)
    if kind not in ("none", "linear"):
        raise ModelFileError(p, f"RoPE scaling type {kind!r} is not supported by the engine (supported: none, linear)")
    if kind == "linear" and factor == 1.0:
        kind = "none"
    return RopeScaling(kind, factor if kind != "none" else 1.0, original_context_length=orig)


def _longrope(p: Path, get: Any, a: str, factors: dict[str, Any]) -> RopeScaling:
    """Phi-3's LongRoPE as llama.cpp's converter writes it (convert_hf_to_gguf.py Phi3MiniModel): the per-frequency
    divisors `rope_factors_long/short.weight` (head_dim / 2 floats each), `rope.scaling.attn_factor` =
    sqrt(1 + ln(s) / ln(orig)) with s = context_length / orig, and orig = `rope.scaling.original_context_length`
    (llama.cpp's n_ctx_orig_yarn, which falls back to the trained context when the key is absent)."""
    if len(factors) != 2:
        raise ModelFileError(p, f"LongRoPE needs rope_factors_long and rope_factors_short, found {sorted(factors)}")

    def table(kind: str) -> tuple[float, ...]:
        t = factors[f"rope_factors_{kind}.weight"]
        return tuple(float(v) for v in np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).ravel())

    long_, short = table("long"), table("short")
    ctx = int(get(f"{a}.context_length", 2048))
    orig = int(get(f"{a}.rope.scaling.original_context_length", ctx))
    try:
        return RopeScaling("longrope", ctx / orig, original_context_length=orig,
                           attention_factor=float(get(f"{a}.rope.scaling.attn_factor", 1.0)),
                           long_factor=long_, short_factor=short)
    except ValueError as exc:
        raise ModelFileError(p, f"bad LongRoPE metadata: {exc}") from None


class _ShardReader:
    """Dequantises selected rows/columns of GGUF tensors into torch tensors of one dtype."""

    def __init__(self, path: Path, reader: gguf.GGUFReader, dtype: torch.dtype) -> None:
        self.path = path
        self.tensors = {t.name: t for t in reader.tensors}
        self.dtype = dtype

    def _tensor(self, name: str, shape: tuple[int, ...]) -> Any:
        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(self.path, f"tensor {name!r} is missing")
        got = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        if got != shape:
            raise ModelFileError(self.path, f"tensor {name!r} has shape {got}, the config implies {shape}")
        return t

    def _dequant(self, name: str, t: Any, data: np.ndarray) -> np.ndarray:
        try:
            return gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError as exc:
            raise ModelFileError(self.path, f"tensor {name!r}: {exc}") from None

    def _check_finite(self, name: str, values: np.ndarray) -> None:
        # Garbage bytes in weights decode to NaN/inf often enough to be worth one pass to say so at load time
        # (checked per dequantised chunk, so the check itself needs no tensor-sized buffer).
        if not np.isfinite(values).all():
            raise ModelFileError(self.path, f"tensor {name!r} holds NaN/inf values (corrupt data)")

    def vector(self, name: str, n: int, start: int = 0, end: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements [start, end) of a 1-D tensor of length n (norm weights, biases, rope_freqs)."""
        t = self._tensor(name, (n,))
        end = n if end is None else end
        full = self._dequant(name, t, t.data)
        self._check_finite(name, full)
        return torch.tensor(np.asarray(full[start:end], dtype=np.float32), dtype=dtype or self.dtype)

    def matrix(self, name: str, shape: tuple[int, int], rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [r0, r1) × columns [c0, c1) of a 2-D tensor (torch (out, in) layout), dequantised chunk-wise."""
        t = self._tensor(name, shape)
        n_rows, n_cols = shape
        r0, r1 = rows or (0, n_rows)
        c0, c1 = cols or (0, n_cols)
        dtype = dtype or self.dtype
        out = torch.empty((r1 - r0, c1 - c0), dtype=dtype)
        # float32/float16 outputs are written through numpy (which casts); others via a float32 staging tensor.
        direct = out.numpy() if dtype in (torch.float32, torch.float16) else None
        step = max(1, _CHUNK_ELEMS // n_cols)
        for a in range(r0, r1, step):
            b = min(a + step, r1)
            block = self._dequant(name, t, t.data[a:b])[:, c0:c1]
            self._check_finite(name, block)
            if direct is not None:
                direct[a - r0 : b - r0] = block
            else:
                stage = torch.empty(block.shape, dtype=torch.float32)
                stage.numpy()[:] = block
                out[a - r0 : b - r0] = stage
        return out

    def rows(self, name: str, shape: tuple[int, int], rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> GGUFRows | torch.Tensor:
        """Rows × columns of a 2-D tensor in the file's own bytes (model/file_format.py), for quant="native".

        Columns are cut on whole quantisation blocks (the planner keeps tensor-parallel splits on the block grid,
        32 inputs for legacy types and 256 for K-quants); a cut off the grid gets the dequantised float32 values
        instead (said in the log), which the shard keeps dense."""
        t = self._tensor(name, shape)
        r0, r1 = rows or (0, shape[0])
        c0, c1 = cols or (0, shape[1])
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if c0 % block or c1 % block:
            log.warning("%s: columns [%d, %d) are off its %s block grid of %d; this slice is kept as float32",
                        name, c0, c1, qtype.name, block)
            return self.matrix(name, shape, rows, cols, dtype=torch.float32)
        raw = np.asarray(t.data[r0:r1]).view(np.uint8).reshape(r1 - r0, -1)
        if (c0, c1) != (0, shape[1]):
            raw = slice_columns(raw, qtype.name, shape[1], (c0, c1))
        if qtype.name in ("F32", "F16"):
            self._check_finite(name, raw.view(np.float32 if qtype.name == "F32" else np.float16))
        elif qtype.name == "BF16" and ((raw.view(np.uint16) & 0x7F80) == 0x7F80).any():  # all-ones exponent
            raise ModelFileError(self.path, f"tensor {name!r} holds NaN/inf values (corrupt data)")
        elif qtype.name in _SCALE_OFFSETS:
            blocks = raw.reshape(-1, block_bytes)
            for off in _SCALE_OFFSETS[qtype.name]:
                if not np.isfinite(blocks[:, off : off + 2].copy().view(np.float16)).all():
                    raise ModelFileError(self.path, f"tensor {name!r} holds NaN/inf block scales (corrupt data)")
        return GGUFRows(raw, qtype.name, c1 - c0)

    def quant_matrix(self, name: str, shape: tuple[int, int], rows: tuple[int, int] | None = None,
                     cols: tuple[int, int] | None = None) -> QuantMatrix | torch.Tensor:
        """Rows × columns of a 2-D tensor as 4-bit groups: the file's own codes for Q4_0/Q4_1 (exact), otherwise
        the float32 values re-quantised per group (model/quant.py); a float32 tensor when the columns cannot
        form whole groups (a row-parallel cut off the 32-column grid), which the shard keeps dense."""
        t = self._tensor(name, shape)
        r0, r1 = rows or (0, shape[0])
        c0, c1 = cols or (0, shape[1])
        qm = from_gguf_blocks(t.data[r0:r1], t.tensor_type.name, (c0, c1))
        if qm is None:
            dense = self.matrix(name, shape, rows, cols, dtype=torch.float32)
            return quantize_rtn(dense) if (c1 - c0) % GROUP == 0 else dense
        if not (torch.isfinite(qm.scale).all() and torch.isfinite(qm.zero).all()):
            raise ModelFileError(self.path, f"tensor {name!r} holds NaN/inf block scales (corrupt data)")
        return qm


def _unpermute(w: Any, n_head: int) -> Any:
    """_unpermute_rows for a dense tensor, a QuantMatrix (whose codes, scales and zeros share the rows) or the
    file's bytes of whole rows (GGUFRows)."""
    if isinstance(w, QuantMatrix):
        return w.map_rows(lambda t: _unpermute_rows(t, n_head))
    if isinstance(w, GGUFRows):
        # (a copy: the rows are a read-only view of the memory-mapped file)
        return w.map_rows(lambda raw: _unpermute_rows(torch.from_numpy(np.array(raw)), n_head).numpy())
    return _unpermute_rows(w, n_head)


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for interleaved RoPE (convert_hf_to_gguf.py, LlamaModel.permute).

    The converter maps each head's rows from HF's half-split order (2, hd/2) to pairs (hd/2, 2); the inverse
    (as transformers' GGUF loader does) restores rotate_half order. It acts within a head, so it applies
    unchanged to any contiguous head range a shard holds.
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def load_weights(path: str | Path, cfg: ModelConfig, spec: ShardSpec, dtype: torch.dtype = torch.float32,
                 quant: str | None = None) -> dict[str, Any]:
    """The tensors shard `spec` owns, under the canonical names of contracts.md, dequantised to `dtype`.

    quant="native" (`--dtype auto`): every matrix (layers, embedding, head) comes back as `GGUFRows`, the file's
    own bytes for this shard's rows and columns (model/file_format.py), for `ModelShard` to pack; vectors as float32.
    quant="int4": the layers' seven matrices come back as `QuantMatrix` (4-bit codes, model/quant.py) instead of
    dense tensors, and everything else (norms, biases, embedding, head) in float32 whatever `dtype` says, for
    `ModelShard` to store each in its own precision; an HF directory's dense matrices are quantised by `ModelShard`.
    Extra name: "rope_freqs" (head_dim // 2,) float32 when the GGUF carries llama3 RoPE divisors.
    """
    p = Path(path)
    if quant is not None and quant not in QUANT_FORMATS:
        raise ValueError(f"unknown weight quantisation {quant!r}: expected one of {QUANT_FORMATS}")
    if quant:
        dtype = torch.float32
    if _is_hf_dir(p):
        from .hf import load_hf_weights  # lazy: see read_config

        return load_hf_weights(p, cfg, spec, dtype)
    spec.validate(cfg)
    src = _ShardReader(p, open_gguf(p), dtype)
    matrix = {None: src.matrix, "int4": src.quant_matrix, "native": src.rows}[quant]
    table = src.rows if quant == "native" else src.matrix  # the embedding and head
    hidden, hd = cfg.hidden_size, cfg.head_dim
    h0, h1 = spec.heads(cfg)
    k0, k1 = spec.kv_heads
    f0, f1 = spec.ffn
    # Only llama.cpp's LlamaModel converter permutes q/k for interleaved RoPE; qwen2/qwen3/gemma3/phi3 GGUFs keep
    # HF's rotate_half order (their graphs use NEOX-style RoPE).
    permuted = cfg.arch == "llama"
    out: dict[str, torch.Tensor] = {}
    if spec.has_embedding:
        out["embed"] = table("token_embd.weight", (cfg.vocab_size, hidden))
    if spec.has_output:
        out["norm"] = src.vector("output_norm.weight", hidden)
        head = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
        if cfg.tie_embeddings and "embed" in out:
            out["lm_head"] = out["embed"]
        else:
            out["lm_head"] = table(head, (cfg.vocab_size, hidden))
    if "rope_freqs.weight" in src.tensors:
        out["rope_freqs"] = src.vector("rope_freqs.weight", hd // 2, dtype=torch.float32)
    q_dim, kv_dim = cfg.n_heads * hd, cfg.n_kv_heads * hd

    def router(name: str) -> torch.Tensor:  # every shard routes every token: the whole matrix, in float32
        return src.matrix(name, (cfg.n_expert, hidden), dtype=torch.float32)

    for i in range(*spec.layers):
        b, n = f"blk.{i}.", f"layers.{i}."
        out[n + "attn_norm"] = src.vector(b + "attn_norm.weight", hidden)
        out[n + "ffn_norm"] = src.vector(b + "ffn_norm.weight", hidden)
        if cfg.qk_norm:  # one weight per head_dim element, shared by every head (llama.cpp's gemma3/qwen3 graphs)
            out[n + "q_norm"] = src.vector(b + "attn_q_norm.weight", hd)
            out[n + "k_norm"] = src.vector(b + "attn_k_norm.weight", hd)
        if cfg.post_norms:
            out[n + "post_attn_norm"] = src.vector(b + "post_attention_norm.weight", hidden)
            out[n + "post_ffn_norm"] = src.vector(b + "post_ffw_norm.weight", hidden)
        if cfg.arch == "phi3":
            # Phi-3 stores q, k, v as one `attn_qkv` (rows q | k | v) and gate, up as one `ffn_up` (rows gate | up),
            # as in HF's qkv_proj / gate_up_proj; a shard reads its row ranges of each part.
            qkv_shape, gu_shape = (q_dim + 2 * kv_dim, hidden), (2 * cfg.ffn_size, hidden)
            out[n + "q"] = matrix(b + "attn_qkv.weight", qkv_shape, rows=(h0 * hd, h1 * hd))
            out[n + "k"] = matrix(b + "attn_qkv.weight", qkv_shape, rows=(q_dim + k0 * hd, q_dim + k1 * hd))
            out[n + "v"] = matrix(b + "attn_qkv.weight", qkv_shape,
                                  rows=(q_dim + kv_dim + k0 * hd, q_dim + kv_dim + k1 * hd))
            out[n + "o"] = matrix(b + "attn_output.weight", (hidden, q_dim), cols=(h0 * hd, h1 * hd))
            out[n + "gate"] = matrix(b + "ffn_up.weight", gu_shape, rows=(f0, f1))
            out[n + "up"] = matrix(b + "ffn_up.weight", gu_shape, rows=(cfg.ffn_size + f0, cfg.ffn_size + f1))
            out[n + "down"] = matrix(b + "ffn_down.weight", (hidden, cfg.ffn_size), cols=(f0, f1))
            continue
        q = matrix(b + "attn_q.weight", (cfg.n_heads * hd, hidden), rows=(h0 * hd, h1 * hd))
        k = matrix(b + "attn_k.weight", (cfg.n_kv_heads * hd, hidden), rows=(k0 * hd, k1 * hd))
        out[n + "q"] = _unpermute(q, h1 - h0) if permuted else q
        out[n + "k"] = _unpermute(k, k1 - k0) if permuted else k
        out[n + "v"] = matrix(b + "attn_v.weight", (cfg.n_kv_heads * hd, hidden), rows=(k0 * hd, k1 * hd))
        if cfg.attention_bias:
            qb = src.vector(b + "attn_q.bias", cfg.n_heads * hd, h0 * hd, h1 * hd)
            kb = src.vector(b + "attn_k.bias", cfg.n_kv_heads * hd, k0 * hd, k1 * hd)
            out[n + "q_bias"] = _unpermute_rows(qb, h1 - h0) if permuted else qb
            out[n + "k_bias"] = _unpermute_rows(kb, k1 - k0) if permuted else kb
            out[n + "v_bias"] = src.vector(b + "attn_v.bias", cfg.n_kv_heads * hd, k0 * hd, k1 * hd)
        out[n + "o"] = matrix(b + "attn_output.weight", (hidden, cfg.n_heads * hd), cols=(h0 * hd, h1 * hd))
        if cfg.is_moe:  # router + this shard's experts, each in the shard's weight form (model/moe.py)
            out.update(load_moe_layer(src.tensors, matrix, router, b, n, hidden, cfg.ffn_size, spec.expert_range(cfg),
                                      (f0, f1)))
            if holds_shared_expert(cfg, spec):
                out.update(load_shared_expert(matrix, src.vector, b, n, hidden, cfg.shared_expert_ffn))
            continue
        out[n + "gate"] = matrix(b + "ffn_gate.weight", (cfg.ffn_size, hidden), rows=(f0, f1))
        out[n + "up"] = matrix(b + "ffn_up.weight", (cfg.ffn_size, hidden), rows=(f0, f1))
        out[n + "down"] = matrix(b + "ffn_down.weight", (hidden, cfg.ffn_size), cols=(f0, f1))
    log.debug("loaded %d tensors of %s for shard %s", len(out), p.name, spec)
    return out
