"""The fast GGUF header scan agrees with gguf's own reader, and rejects bad files with ModelFileError."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from ollama_distributed.model.errors import ModelFileError
from ollama_distributed.service.gguf_info import human_parameter_count, read_gguf_summary, validate_gguf


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_matches_gguf_reader(which: str, tiny_gguf: Path, smollm2_path: Path) -> None:
    path = tiny_gguf if which == "tiny" else smollm2_path
    ours = read_gguf_summary(path, keep_array_len=-1, with_tensors=True)
    ref = gguf.GGUFReader(path)
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(ref_meta)
    for key, value in ref_meta.items():
        got = ours.metadata[key]
        if isinstance(value, float):
            assert got == pytest.approx(value), key
        else:
            assert got == _plain(value), key
    assert ours.parameter_count == sum(int(t.n_elements) for t in ref.tensors)
    assert [t["name"] for t in ours.tensors] == [t.name for t in ref.tensors]
    assert ours.data_end == max(int(t.data_offset) + int(t.n_bytes) for t in ref.tensors)
    validate_gguf(path)


def test_smollm2_details(smollm2_path: Path) -> None:
    s = read_gguf_summary(smollm2_path)
    assert (s.architecture, s.file_type, s.parameter_size, s.context_length) == ("llama", "Q4_1", "134.52M", 8192)
    assert s.metadata["tokenizer.ggml.tokens"] == []  # long arrays skipped by default
    assert s.metadata["general.languages"] == ["en"]


def test_human_parameter_count() -> None:
    assert human_parameter_count(134_515_008) == "134.52M"
    assert human_parameter_count(8_030_261_248) == "8.0B"
    assert human_parameter_count(7_000_000_000) == "7B"
    assert human_parameter_count(1234) == "1.23K"


def test_bad_files(tmp_path: Path, tiny_gguf: Path) -> None:
    cases = {
        "missing.gguf": None,
        "empty.gguf": b"",
        "magic.gguf": b"GGML" + b"\0" * 100,
        "version.gguf": b"GGUF" + (99).to_bytes(4, "little") + b"\0" * 100,
        "header.gguf": b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (5).to_bytes(8, "little"),
        "truncated.gguf": tiny_gguf.read_bytes()[:1_000_000],
    }
    for name, data in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(ModelFileError) as exc:
            validate_gguf(p)
        assert str(p) in str(exc.value), name
