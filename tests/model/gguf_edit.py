"""Rewrite a GGUF file with changes (test helper): other architectures, extra/dropped tensors, edited keys.

Copies every metadata field with its original GGUF type and every tensor's raw (possibly quantised) bytes
through gguf's own writer, so the result is a well-formed GGUF that differs only where asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np


def rewrite_gguf(
    src: str | Path,
    dst: str | Path,
    *,
    arch: str | None = None,
    set_fields: dict[str, tuple[Any, gguf.GGUFValueType]] | None = None,
    drop_fields: tuple[str, ...] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
    drop_tensors: tuple[str, ...] = (),
) -> Path:
    """Copy `src` to `dst` with: a new general.architecture (keys `{old}.*` renamed to `{arch}.*`), fields set
    (key -> (value, type)) or dropped, float32 tensors added, tensors dropped."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    w = gguf.GGUFWriter(str(dst), new_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_fields:
            continue
        if key.startswith(old_arch + "."):
            key = new_arch + key[len(old_arch):]
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)
    for key, (value, vtype) in (set_fields or {}).items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        quantised = t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type if quantised else None)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)
