"""model/formats.py: the weight formats, KV cache types and GGUF type sizes every layer names."""

import subprocess
import sys

import gguf
import pytest

from ollama_distributed.model import formats


def test_gguf_type_sizes_are_gguf_py_s():
    """Our table is gguf-py's GGML_QUANT_SIZES for every type it names (the scheduler cannot import gguf)."""
    for qtype, size in gguf.GGML_QUANT_SIZES.items():
        assert formats.gguf_type_size(qtype.name) == tuple(size), qtype.name
    for name in formats.GGUF_TYPE_SIZES:
        assert tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]) == formats.GGUF_TYPE_SIZES[name]


@pytest.mark.parametrize("name,bpe,block", [
    ("F32", 4.0, 1), ("F16", 2.0, 1), ("BF16", 2.0, 1), ("Q8_0", 34 / 32, 32), ("Q4_0", 18 / 32, 32),
    ("Q4_1", 20 / 32, 32), ("Q5_0", 22 / 32, 32), ("Q5_1", 24 / 32, 32), ("Q4_K", 144 / 256, 256),
    ("Q5_K", 176 / 256, 256), ("Q6_K", 210 / 256, 256), ("q2_k", 84 / 256, 256),
])
def test_bytes_per_element_and_block(name, bpe, block):
    assert formats.bytes_per_element(name) == bpe
    assert formats.block_size(name) == block


def test_tensor_nbytes_and_unknown_type():
    assert formats.tensor_nbytes("Q4_K", (4096, 11008)) == 4096 * 11008 // 256 * 144
    assert formats.GGUFTensor("w", "Q8_0", (64, 3)).nbytes == 2 * 3 * 34
    with pytest.raises(ValueError, match="unknown GGUF tensor type 'Q9_9'"):
        formats.bytes_per_element("Q9_9")


def test_weight_formats_round_trip():
    assert formats.WEIGHT_FORMATS == ("auto", "float32", "bfloat16", "float16", "int4")
    assert formats.DEFAULT_WEIGHT_FORMAT == "auto"
    for f in formats.FORMATS.values():
        assert formats.weight_format_name(f.compute_dtype, f.quant) == f.name
    assert formats.weight_format_name("torch.bfloat16") == "bfloat16"
    assert formats.weight_format_name("torch.float32", "native") == "auto"
    with pytest.raises(ValueError, match="expected auto|float32|bfloat16|float16|int4"):
        formats.weight_format_info("int3")


@pytest.mark.parametrize("fmt,setting,want", [
    ("auto", None, "f16"), ("float32", None, "f32"), ("bfloat16", None, "bf16"), ("float16", None, "f16"),
    ("int4", None, "f32"), ("auto", "q8_0", "q8_0"), ("float32", "f16", "f16"), ("int4", "F16", "f16"),
    ("auto", "f32", "f32"),
])
def test_kv_cache_type_rule(fmt, setting, want):
    assert formats.kv_cache_type(fmt, setting) == want


def test_kv_bytes():
    assert formats.KV_CACHE_TYPES == ("f32", "f16", "q8_0") and formats.DEFAULT_KV_CACHE_TYPE == "f16"
    assert [formats.kv_bytes_per_element(t) for t in ("f32", "f16", "bf16", "q8_0")] == [4, 2, 2, 34 / 32]


def test_kv_cache_type_from_env():
    env = formats.KV_CACHE_ENV
    assert env == "OLLAMA_KV_CACHE_TYPE"
    assert formats.kv_cache_type_from_env({}) is None
    assert formats.kv_cache_type_from_env({env: ""}) is None  # Ollama: empty = its default
    assert formats.kv_cache_type_from_env({env: " Q8_0 "}) == "q8_0"
    with pytest.raises(ValueError, match=r"unknown KV cache type 'q4_0' \(OLLAMA_KV_CACHE_TYPE / --kv-cache-type\): "
                                         r"expected f32\|f16\|q8_0"):
        formats.kv_cache_type_from_env({env: "q4_0"})


def test_q4_k_m_average_is_llama_cpp_s():
    """3.80 GiB for LLaMA-7B (llama.cpp quantize.cpp's Q4_K_M line) = 4.84 bits per weight."""
    assert formats.Q4_K_M_BITS_PER_WEIGHT == pytest.approx(4.844, abs=1e-3)
    assert formats.q4_k_m_block(11008) == 256 and formats.q4_k_m_block(576) == 32


def test_formats_is_pure():
    code = ("import sys, ollama_distributed.model.formats; "
            "print(','.join(m for m in ('torch', 'numpy', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
