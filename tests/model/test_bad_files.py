"""Bad model files fail with a typed error that names the file and the problem — never a numpy traceback."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from ollama_distributed.model.errors import ModelFileError, UnsupportedArchitectureError
from ollama_distributed.model.shard import ShardSpec
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.model.weights import load_weights, read_config, read_metadata
from tests.model.gguf_edit import rewrite_gguf


@pytest.fixture(scope="module")
def good(tiny_gguf_factory) -> Path:
    return tiny_gguf_factory(vocab=1024, n_layers=2)


def open_all(path: Path) -> None:
    """Everything a server does with a model file: metadata, config, every weight."""
    read_metadata(path)
    cfg = read_config(path)
    load_weights(path, cfg, ShardSpec.full(cfg))


def write_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match=r"nothere\.gguf: file does not exist"):
        read_config(tmp_path / "nothere.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelFileError, match="directory without config.json"):
        read_config(tmp_path)


def test_empty_file(tmp_path):
    with pytest.raises(ModelFileError, match=r"empty\.gguf: truncated: 0 bytes"):
        read_config(write_bytes(tmp_path, "empty.gguf", b""))


def test_wrong_magic(tmp_path, good):
    data = bytearray(good.read_bytes())
    data[:4] = b"GGML"
    path = write_bytes(tmp_path, "magic.gguf", bytes(data))
    with pytest.raises(ModelFileError, match=r"magic\.gguf: not a GGUF file: magic b'GGML'"):
        read_config(path)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        ModelShard.from_file(write_bytes(tmp_path, "text.gguf", b"<html>not a model</html>"))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_in_tensor_data(tmp_path, good, keep):
    data = good.read_bytes()
    path = write_bytes(tmp_path, f"cut{keep}.gguf", data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match=rf"cut{keep}\.gguf: truncated: tensor data runs to byte \d+ but the file has {int(len(data) * keep)} bytes"):
        open_all(path)


def test_truncated_anywhere_is_a_model_file_error(tmp_path, good):
    data = good.read_bytes()
    for i, cut in enumerate(np.linspace(5, len(data) - 1, 40).astype(int)):
        path = write_bytes(tmp_path, f"cut_{i}.gguf", data[:cut])
        with pytest.raises(ModelFileError, match=rf"cut_{i}\.gguf: truncated"):
            open_all(path)


def test_corrupt_header_bytes(tmp_path, good):
    """Garbage over the key/value header: every outcome is either a clean load or a ModelFileError."""
    data = good.read_bytes()
    reader = gguf.GGUFReader(good)
    header_end = reader.data_offset
    rng = np.random.default_rng(0)
    failures = 0
    for i in range(40):
        bad = bytearray(data)
        start = int(rng.integers(8, min(header_end, 4000)))
        bad[start : start + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        path = write_bytes(tmp_path, f"corrupt_{i}.gguf", bytes(bad))
        try:
            open_all(path)
        except ModelFileError as exc:
            failures += 1
            assert f"corrupt_{i}.gguf" in str(exc)
    assert failures > 0


def test_corrupt_counts_name_the_problem(tmp_path, good):
    data = bytearray(good.read_bytes())
    data[16:24] = (2**40).to_bytes(8, "little")  # kv_count: far more fields than the file holds
    path = write_bytes(tmp_path, "kvcount.gguf", bytes(data))
    with pytest.raises(ModelFileError, match=r"kvcount\.gguf: (truncated or corrupt header|corrupt GGUF header)"):
        read_config(path)


def test_corrupt_tensor_data_is_caught(tmp_path, good):
    """0xFF bytes decode to NaN in an F32 weight: refused at load time with the tensor's name."""
    tensor = next(t for t in gguf.GGUFReader(good).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(good.read_bytes())
    data[tensor.data_offset : tensor.data_offset + 64] = b"\xff" * 64
    path = write_bytes(tmp_path, "nan.gguf", bytes(data))
    with pytest.raises(ModelFileError, match=r"nan\.gguf: tensor 'blk\.1\.ffn_up\.weight' holds NaN/inf"):
        open_all(path)


def test_corrupt_block_scales_are_caught_in_the_files_format(tmp_path, tiny_gguf_factory):
    """`--dtype auto` keeps the file's blocks: a NaN block scale is refused at load time with the tensor's name."""
    good = tiny_gguf_factory(vocab=1024, n_layers=2, dtype="q4_k", hidden=256, n_heads=8, n_kv_heads=2, ffn=512)
    tensor = next(t for t in gguf.GGUFReader(good).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(good.read_bytes())
    data[tensor.data_offset + 144 : tensor.data_offset + 146] = b"\xff\xff"  # the second block's d
    path = write_bytes(tmp_path, "nanscale.gguf", bytes(data))
    cfg = read_config(path)
    with pytest.raises(ModelFileError, match=r"nanscale\.gguf: tensor 'blk\.1\.ffn_up\.weight' holds NaN/inf block"):
        load_weights(path, cfg, ShardSpec.full(cfg), quant="native")


@pytest.mark.parametrize("arch", ["gpt2", "mamba", "falcon"])
def test_unsupported_architecture(tmp_path, good, arch):
    path = rewrite_gguf(good, tmp_path / f"{arch}.gguf", arch=arch)
    with pytest.raises(UnsupportedArchitectureError, match=rf"{arch}\.gguf: unsupported model architecture '{arch}'") as info:
        ModelShard.from_file(path)
    assert info.value.architecture == arch and isinstance(info.value, ModelFileError)
    # the message lists what does load
    for supported in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
        assert supported in str(info.value)


def test_missing_tensor(tmp_path, good):
    path = rewrite_gguf(good, tmp_path / "holes.gguf", drop_tensors=("blk.1.attn_v.weight",))
    with pytest.raises(ModelFileError, match=r"holes\.gguf: tensor 'blk\.1\.attn_v\.weight' is missing"):
        open_all(path)
    # a shard that does not need the tensor still loads: only owned tensors are read
    cfg = read_config(path)
    load_weights(path, cfg, ShardSpec((0, 1), (0, 3), (0, 128), True, False))


def test_missing_metadata_key(tmp_path, good):
    path = rewrite_gguf(good, tmp_path / "nokey.gguf", drop_fields=("llama.block_count",))
    with pytest.raises(ModelFileError, match=r"nokey\.gguf: metadata key 'llama\.block_count' is missing"):
        read_config(path)


def test_inconsistent_metadata(tmp_path, good):
    path = rewrite_gguf(good, tmp_path / "heads.gguf", set_fields={"llama.attention.head_count_kv": (4, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ModelFileError, match=r"heads\.gguf: inconsistent model metadata: n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        read_config(path)
    path = rewrite_gguf(good, tmp_path / "wide.gguf", set_fields={"llama.feed_forward_length": (256, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ModelFileError, match=r"wide\.gguf: tensor 'blk\.0\.ffn_gate\.weight' has shape \(128, 96\), the config implies \(256, 96\)"):
        open_all(path)


def test_unsupported_rope_scaling(tmp_path, good):
    path = rewrite_gguf(good, tmp_path / "yarn.gguf", set_fields={"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)})
    with pytest.raises(ModelFileError, match=r"yarn\.gguf: RoPE scaling type 'yarn' is not supported"):
        read_config(path)
