"""A fast read of a GGUF header: metadata and tensor shapes, without touching tensor data.

The model store needs, for every listed model, the architecture, parameter count and file type (`/api/tags`
details) and, for `/api/show`, the metadata. `gguf.GGUFReader` builds a numpy view per field part and takes ~2 s on
SmolLM2's 49k-token vocabulary; this scanner walks the same layout (GGUF spec, ggml docs/gguf.md: magic, version,
tensor count, KV count, KVs, tensor infos; little-endian) with `struct.unpack_from` over an mmap and skips arrays
it is not asked to keep, so a listing stays in milliseconds. Tensor data is never read.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.errors import ModelFileError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY = 1 << 31


@dataclass(frozen=True)
class GGUFSummary:
    """What the store shows about a GGUF file.

    metadata: KV fields as python values; arrays longer than `keep_array_len` are replaced by [] (Ollama's
      `/api/show` empties token arrays unless verbose).
    parameter_count: Σ elements over all tensors.
    """

    path: Path
    metadata: dict[str, Any]
    parameter_count: int
    tensors: list[dict[str, Any]] = field(default_factory=list)
    data_end: int = 0  # bytes the tensor data needs (header + aligned data); > file size means truncated

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def file_type(self) -> str:
        """Quantization name as Ollama shows it (`Q4_1`, `F16`, `Q4_K_M`), from `general.file_type`."""
        raw = self.metadata.get("general.file_type")
        if raw is None:
            return "unknown"
        try:
            import gguf

            return gguf.LlamaFileType(int(raw)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (ValueError, ImportError):
            return f"unknown({raw})"

    @property
    def parameter_size(self) -> str:
        return human_parameter_count(self.parameter_count)

    @property
    def context_length(self) -> int:
        return int(self.metadata.get(f"{self.architecture}.context_length", 0) or 0)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.metadata.get("tokenizer.chat_template"))


def human_parameter_count(n: int) -> str:
    """Ollama's format.HumanNumber: `134.52M`, `8.0B`, `7B`."""
    for unit, scale, fmt in (("B", 1e9, "{:.1f}"), ("M", 1e6, "{:.2f}"), ("K", 1e3, "{:.2f}")):
        if n >= scale:
            value = n / scale
            if value == int(value):
                return f"{int(value)}{unit}"
            return fmt.format(value) + unit
    return str(n)


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelFileError(self.path, f"GGUF header is truncated at byte {self.pos} (file is {len(self.buf)} bytes)")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if count > _MAX_ARRAY:
                raise ModelFileError(self.path, f"GGUF array of {count} elements is implausible (corrupt header)")
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype])
                self.need(size * count)
                if keep:
                    out = list(struct.unpack_from(f"<{count}{_SCALARS[etype][1]}", self.buf, self.pos))
                else:
                    out = []
                self.pos += size * count
                return out
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else []
        raise ModelFileError(self.path, f"unknown GGUF value type {vtype} at byte {self.pos} (corrupt header)")


def read_gguf_summary(path: str | Path, keep_array_len: int = 64, with_tensors: bool = False) -> GGUFSummary:
    """Scan a GGUF file's header. Arrays with more than `keep_array_len` elements come back as [] unless
    `keep_array_len` < 0 (keep everything). Raises ModelFileError (naming the file) on anything malformed."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ModelFileError(path, f"cannot open model file: {exc.strerror or exc}") from exc
    with f:
        if path.stat().st_size < 24:
            raise ModelFileError(path, f"not a GGUF file (only {path.stat().st_size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _scan(_Cursor(buf, path), keep_array_len, with_tensors)


def _scan(cur: _Cursor, keep_array_len: int, with_tensors: bool) -> GGUFSummary:
    path = cur.path
    cur.need(4)
    if bytes(cur.buf[0:4]) != b"GGUF":
        raise ModelFileError(path, f"not a GGUF file (magic {bytes(cur.buf[0:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ModelFileError(path, f"implausible GGUF header ({n_tensors} tensors, {n_kv} fields): corrupt file")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.scalar("<I")
        start = cur.pos
        if vtype == _ARRAY and keep_array_len >= 0:
            # Peek at the count to decide whether to materialise the array.
            count = struct.unpack_from("<Q", cur.buf, cur.pos + 4)[0] if cur.pos + 12 <= len(cur.buf) else 0
            keep = count <= keep_array_len
        else:
            keep = True
        cur.pos = start
        metadata[key] = cur.value(vtype, keep)
    total = 0
    tensors = []
    data_bytes = 0
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > 8:
            raise ModelFileError(path, f"tensor {name!r} has {n_dims} dimensions (corrupt header)")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        ttype, offset = cur.scalar("<I"), cur.scalar("<Q")
        n = 1
        for d in dims:
            n *= d
        total += n
        data_bytes = max(data_bytes, offset + _tensor_nbytes(path, name, ttype, n))
        if with_tensors:
            tensors.append({"name": name, "type": ttype, "shape": dims, "offset": offset})
    align = int(metadata.get("general.alignment", 32) or 32)
    data_start = (cur.pos + align - 1) // align * align
    return GGUFSummary(path=path, metadata=metadata, parameter_count=total, tensors=tensors,
                       data_end=data_start + data_bytes)


def _tensor_nbytes(path: Path, name: str, ttype: int, n_elements: int) -> int:
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        raise ModelFileError(path, f"tensor {name!r} has unknown ggml type {ttype} (corrupt header?)") from None
    return n_elements // block * type_size


def validate_gguf(path: str | Path) -> GGUFSummary:
    """Header summary, also checking that the file holds all the tensor data it declares (a truncated
    download has a valid header but too few bytes). Raises ModelFileError."""
    path = Path(path)
    summary = read_gguf_summary(path)
    size = path.stat().st_size
    if summary.data_end > size:
        raise ModelFileError(path, f"file is truncated: its tensors need {summary.data_end} bytes, it has {size}")
    if not summary.architecture:
        raise ModelFileError(path, "GGUF metadata has no general.architecture")
    return summary
