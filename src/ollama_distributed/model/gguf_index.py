"""A fast GGUF reader: the header parsed in milliseconds, tensors as memory-mapped numpy views.

`gguf.GGUFReader` builds one numpy view per part of every metadata field: two per token of a 49k-token
vocabulary and two per BPE merge, ~200k small arrays, ~1.8 s for SmolLM2-135M and for the tests' tiny model
alike (measured; bench/README.md "Recovery"). Every shard worker the runtime starts opens the file once, so this
was most of the time to start a shard, and so of recovering from a lost node.

`GGUFIndex` walks the same layout (GGUF spec, ggml docs/gguf.md: magic, version, tensor count, KV count, KVs,
tensor infos, aligned tensor data; little-endian) with `struct.unpack_from` over one memmap and keeps arrays
lazily (offset, element type, count): decoded only when `contents()` is asked for them. Its interface is the part
of GGUFReader that model/weights.py uses:
  .fields  name → field with `.name`, `.types` and `.contents()` (same values as gguf.ReaderField.contents(),
           including the reader's pseudo-fields GGUF.version / GGUF.tensor_count / GGUF.kv_count);
  .tensors list of `gguf.ReaderTensor` exactly as GGUFReader builds them (`data` a view into the memmap:
           the typed element array for float/int types, rows of raw block bytes for quantised ones);
  .data (the memmap), .data_offset, .alignment.
Byte-swapped (big-endian) files and nested arrays are not handled here: `NotHandled` tells the caller to fall back
to GGUFReader. A read past the end raises `Truncated(end, size, in_data)`; any other malformation ValueError.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32  # gguf spec: general.alignment defaults to 32

# GGUF value type → (struct format, numpy dtype) of the scalar types
_SCALARS: dict[int, tuple[str, Any]] = {
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.BOOL: ("<?", np.bool_),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
}
# element dtype of the tensor types GGUFReader exposes as typed arrays (the rest: raw block bytes)
_TYPED_TENSORS = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}


class Truncated(Exception):
    """A read past the end of the file: it needs byte `end`, the file has `size` (in tensor data or header)."""

    def __init__(self, end: int, size: int, in_data: bool) -> None:
        super().__init__(end, size, in_data)
        self.end, self.size, self.in_data = end, size, in_data


class NotHandled(Exception):
    """A valid GGUF feature this reader leaves to gguf.GGUFReader (byte-swapped files, nested arrays)."""


class IndexField:
    """One metadata key/value. Scalars and strings are decoded at parse time; arrays on `contents()`."""

    __slots__ = ("name", "types", "offset", "_value", "_array")

    def __init__(self, name: str, types: list[GGUFValueType], offset: int, value: Any = None,
                 array: tuple["GGUFIndex", int, int, int] | None = None) -> None:
        self.name, self.types, self.offset = name, types, offset
        self._value, self._array = value, array

    def contents(self) -> Any:
        if self._array is None:
            return self._value
        index, itype, count, offs = self._array
        return index._decode_array(itype, count, offs)


class GGUFIndex:
    """The parsed header of the GGUF file at `path` (see module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.data = np.memmap(self.path, mode="r")
        self._buf = memoryview(self.data)
        self._size = len(self.data)
        self.data_offset: int | None = None
        self.fields: OrderedDict[str, IndexField] = OrderedDict()
        magic, version = self._unpack("<II", 0)
        if magic != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        if version & 0xFFFF == 0:
            raise NotHandled("byte-swapped GGUF")
        if version not in _SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (supported: {_SUPPORTED_VERSIONS})")
        n_tensors, n_kv = self._unpack("<QQ", 8)
        self._push(IndexField("GGUF.version", [GGUFValueType.UINT32], 4, version))
        self._push(IndexField("GGUF.tensor_count", [GGUFValueType.UINT64], 8, n_tensors))
        self._push(IndexField("GGUF.kv_count", [GGUFValueType.UINT64], 16, n_kv))
        offs = 24
        for _ in range(n_kv):
            start = offs
            name, offs = self._string(offs)
            (raw,) = self._unpack("<I", offs)
            field, offs = self._value(name, raw, offs + 4, start)
            self._push(field)
        infos = []
        for _ in range(n_tensors):
            name, offs = self._string(offs)
            (n_dims,) = self._unpack("<I", offs)
            dims = self._unpack(f"<{n_dims}Q", offs + 4)
            offs += 4 + 8 * n_dims
            raw_type, rel = self._unpack("<IQ", offs)
            offs += 12
            infos.append((name, dims, raw_type, rel))
        self.alignment = _DEFAULT_ALIGNMENT
        align = self.fields.get("general.alignment")
        if align is not None:
            if align.types != [GGUFValueType.UINT32]:
                raise ValueError("Bad type for general.alignment field")
            self.alignment = int(align.contents())
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise ValueError("Invalid alignment: must be a non-zero power of two")
        self.data_offset = offs + (-offs % self.alignment)
        self.tensors = self._tensors(infos)

    # ---- parsing ------------------------------------------------------------------------------------------------
    def _need(self, end: int) -> None:
        if end > self._size:
            in_data = self.data_offset is not None
            raise Truncated(end, self._size, in_data)

    def _unpack(self, fmt: str, offs: int) -> tuple[Any, ...]:
        self._need(offs + struct.calcsize(fmt))
        return struct.unpack_from(fmt, self._buf, offs)

    def _string(self, offs: int) -> tuple[str, int]:
        (n,) = self._unpack("<Q", offs)
        self._need(offs + 8 + n)
        return str(self._buf[offs + 8 : offs + 8 + n], encoding="utf-8"), offs + 8 + n

    def _value(self, name: str, raw: int, offs: int, start: int) -> tuple[IndexField, int]:
        gtype = GGUFValueType(raw)  # ValueError on an unknown type
        if gtype == GGUFValueType.STRING:
            value, end = self._string(offs)
            return IndexField(name, [gtype], start, value), end
        if gtype in _SCALARS:
            fmt = _SCALARS[gtype][0]
            (value,) = self._unpack(fmt, offs)
            return IndexField(name, [gtype], start, value), offs + struct.calcsize(fmt)
        if gtype != GGUFValueType.ARRAY:
            raise ValueError(f"Unknown/unhandled field type {gtype}")
        itype_raw, count = self._unpack("<IQ", offs)
        itype = GGUFValueType(itype_raw)
        body = offs + 12
        if itype == GGUFValueType.ARRAY:
            raise NotHandled(f"nested array in field {name!r}")
        if itype == GGUFValueType.STRING:
            end = body
            for _ in range(count):  # lengths only: the strings are decoded when asked for
                (n,) = self._unpack("<Q", end)
                end += 8 + n
            self._need(end)
        elif itype in _SCALARS:
            end = body + count * struct.calcsize(_SCALARS[itype][0])
            self._need(end)
        else:
            raise ValueError(f"Unknown/unhandled field type {itype}")
        types = [gtype] + ([itype] if count else [])
        return IndexField(name, types, start, array=(self, int(itype), int(count), body)), end

    def _decode_array(self, itype: int, count: int, offs: int) -> list[Any]:
        if itype == GGUFValueType.STRING:
            out, buf = [], self._buf
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, offs)
                out.append(str(buf[offs + 8 : offs + 8 + n], encoding="utf-8"))
                offs += 8 + n
            return out
        dtype = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
        return np.frombuffer(self._buf, dtype=dtype, count=count, offset=offs).tolist()

    def _push(self, field: IndexField) -> None:
        if field.name in self.fields:
            raise KeyError(f"Duplicate {field.name} already in list at offset {self.fields[field.name].offset}")
        self.fields[field.name] = field

    def _tensors(self, infos: list[tuple[str, tuple[int, ...], int, int]]) -> list[ReaderTensor]:
        assert self.data_offset is not None
        out, seen = [], set()
        for name, dims, raw_type, rel in infos:
            if name in seen:
                raise ValueError(f"Found duplicated tensor with name {name}")
            seen.add(name)
            ggml_type = GGMLQuantizationType(raw_type)
            n_elems = int(np.prod(dims, dtype=object)) if dims else 1
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            n_bytes = n_elems * type_size // block_size
            offs = self.data_offset + rel
            np_dims: tuple[int, ...] = tuple(reversed(dims))
            item_type = _TYPED_TENSORS.get(ggml_type)
            if item_type is None:
                item_type, count = np.uint8, n_bytes
                np_dims = quant_shape_to_byte_shape(np_dims, ggml_type)
            else:
                count = n_elems
            self._need(offs + count * np.dtype(item_type).itemsize)
            data = np.ndarray((count,), dtype=item_type, buffer=self.data, offset=offs).reshape(np_dims)
            out.append(ReaderTensor(name=name, tensor_type=ggml_type, shape=np.array(dims, dtype=np.uint64),
                                    n_elements=n_elems, n_bytes=n_bytes, data_offset=offs, data=data, field=None))
        return out
