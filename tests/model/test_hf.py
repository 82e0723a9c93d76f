"""HF directories: config.json → ModelConfig and safetensors → the canonical tensors of a shard, sliced on read.

The tiny model's weights come from `tiny_llama_hf_state_dict`; transformers writes them (save_pretrained) as
an HF directory, and `write_tiny_llama_gguf` writes the same weights as a GGUF (q/k permuted llama.cpp-style),
so the two readers can be checked against the state dict and against each other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ollama_distributed.model.config import RopeScaling
from ollama_distributed.model.errors import ModelFileError, UnsupportedArchitectureError
from ollama_distributed.model.hf import load_hf_weights, read_hf_config
from ollama_distributed.model.shard import ShardSpec
from ollama_distributed.model.weights import load_weights, read_config
from tests.helpers.tiny_gguf import tiny_llama_hf_state_dict

# n_layers=4, 6 heads in 3 KV groups (head_dim 16), FFN 128: whole, pipeline stages, uneven TP, both.
SPECS = [
    ShardSpec((0, 4), (0, 3), (0, 128), True, True),
    ShardSpec((0, 2), (0, 3), (0, 128), True, False),
    ShardSpec((2, 4), (0, 3), (0, 128), False, True),
    ShardSpec((0, 4), (0, 2), (0, 64), True, True),  # 2 of 3 KV groups, first half of the FFN
    ShardSpec((0, 4), (2, 3), (64, 128), False, False),
    ShardSpec((1, 3), (1, 2), (32, 75), False, False),  # odd FFN cut
    ShardSpec((3, 3), (0, 3), (0, 128), False, True),  # no layers: only the head
]


def _expected(sd: dict[str, np.ndarray], cfg, spec: ShardSpec) -> dict[str, torch.Tensor]:
    """Canonical tensors of `spec`, sliced directly from the full HF state dict."""
    hd = cfg.head_dim
    (h0, h1), (k0, k1), (f0, f1) = spec.heads(cfg), spec.kv_heads, spec.ffn
    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    if spec.has_embedding:
        out["embed"] = t["model.embed_tokens.weight"]
    if spec.has_output:
        out["norm"] = t["model.norm.weight"]
        out["lm_head"] = t["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(*spec.layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        out[n + "attn_norm"] = t[p + "input_layernorm.weight"]
        out[n + "ffn_norm"] = t[p + "post_attention_layernorm.weight"]
        out[n + "q"] = t[p + "self_attn.q_proj.weight"][h0 * hd:h1 * hd]
        out[n + "k"] = t[p + "self_attn.k_proj.weight"][k0 * hd:k1 * hd]
        out[n + "v"] = t[p + "self_attn.v_proj.weight"][k0 * hd:k1 * hd]
        if cfg.attention_bias:
            out[n + "q_bias"] = t[p + "self_attn.q_proj.bias"][h0 * hd:h1 * hd]
            out[n + "k_bias"] = t[p + "self_attn.k_proj.bias"][k0 * hd:k1 * hd]
            out[n + "v_bias"] = t[p + "self_attn.v_proj.bias"][k0 * hd:k1 * hd]
        out[n + "o"] = t[p + "self_attn.o_proj.weight"][:, h0 * hd:h1 * hd]
        out[n + "gate"] = t[p + "mlp.gate_proj.weight"][f0:f1]
        out[n + "up"] = t[p + "mlp.up_proj.weight"][f0:f1]
        out[n + "down"] = t[p + "mlp.down_proj.weight"][:, f0:f1]
    return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == torch.float32 and got[name].shape == w.shape, name
        assert torch.equal(got[name], w), name


VARIANTS = [
    {},
    {"arch": "qwen2"},
    {"tied": True},
    {"arch": "qwen2", "tied": True, "max_shard_size": "150KB"},  # several safetensors files + index
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) or "llama")
def test_weights_equal_state_dict_slices(tiny_hf_dir_factory, variant) -> None:
    d = tiny_hf_dir_factory(**variant)
    cfg = read_hf_config(d)
    arch = variant.get("arch", "llama")
    assert (cfg.arch, cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_size,
            cfg.vocab_size) == (arch, 4, 96, 6, 3, 16, 128, 1024)
    assert cfg.attention_bias == (arch == "qwen2") and cfg.tie_embeddings == variant.get("tied", False)
    if "max_shard_size" in variant:
        assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    sd = tiny_llama_hf_state_dict(vocab=1024, attention_bias=arch == "qwen2", tied=variant.get("tied", False))
    for spec in SPECS:
        _assert_same(load_hf_weights(d, cfg, spec), _expected(sd, cfg, spec))


@pytest.mark.parametrize("variant", [{}, {"arch": "qwen2", "tied": True}], ids=["llama", "qwen2-tied"])
def test_hf_dir_and_gguf_load_the_same_tensors(tiny_hf_dir_factory, tiny_gguf_factory, variant) -> None:
    """The GGUF twin (q/k permuted by the writer, un-permuted by weights.py) gives identical canonical tensors,
    and weights.read_config/load_weights dispatch HF directories here."""
    d = tiny_hf_dir_factory(**variant)
    g = tiny_gguf_factory(vocab=1024, **variant)
    cfg_hf, cfg_gguf = read_config(d), read_config(g)
    assert cfg_hf == read_hf_config(d)
    for field in ("arch", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "ffn_size", "vocab_size",
                  "rope_theta", "rms_norm_eps", "tie_embeddings", "attention_bias", "context_length"):
        assert getattr(cfg_hf, field) == pytest.approx(getattr(cfg_gguf, field)), field
    for spec in SPECS:
        _assert_same(load_weights(d, cfg_hf, spec), load_weights(g, cfg_gguf, spec))


def test_bf16_checkpoint_casts_to_requested_dtype(tiny_hf_dir, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bf16"
    shutil.copytree(tiny_hf_dir, d)
    tensors = load_file(d / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, d / "model.safetensors", metadata={"format": "pt"})
    cfg = read_hf_config(d)
    spec = SPECS[3]
    got = load_hf_weights(d, cfg, spec, dtype=torch.float32)
    want = _expected(tiny_llama_hf_state_dict(vocab=1024), cfg, spec)
    for name, w in want.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], w.to(torch.bfloat16).float()), name
    assert load_hf_weights(d, cfg, spec, dtype=torch.bfloat16)["layers.0.q"].dtype == torch.bfloat16


def _write_config(d: Path, **fields) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 512,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6}
    base.update(fields)
    (d / "config.json").write_text(json.dumps({k: v for k, v in base.items() if v is not None}))
    return d


def test_config_variants(tmp_path: Path) -> None:
    # Llama 3.1-style rope scaling, old-style keys (rope_theta + rope_scaling with "rope_type").
    cfg = read_hf_config(_write_config(
        tmp_path / "l31", rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}))
    assert cfg.rope_theta == 500000.0 and cfg.tie_embeddings and cfg.head_dim == 16
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    # transformers >= 5 style: rope_parameters; pre-4.45 "type" key; explicit head_dim.
    cfg = read_hf_config(_write_config(tmp_path / "lin", rope_parameters={"rope_theta": 1e6, "rope_type": "linear",
                                                                          "factor": 2.0}, head_dim=32))
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == RopeScaling("linear", 2.0) and cfg.head_dim == 32
    assert read_hf_config(_write_config(tmp_path / "old", rope_scaling={"type": "linear", "factor": 4.0})
                          ).rope_scaling.factor == 4.0
    # Mistral is the llama graph; num_key_value_heads defaults to num_attention_heads.
    cfg = read_hf_config(_write_config(tmp_path / "mis", architectures=["MistralForCausalLM"], model_type="mistral",
                                       num_key_value_heads=None, sliding_window=None))
    assert cfg.arch == "llama" and cfg.n_kv_heads == 4 and not cfg.attention_bias
    cfg = read_hf_config(_write_config(tmp_path / "qw", architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    assert cfg.arch == "qwen2" and cfg.attention_bias


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        read_hf_config(_write_config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ModelFileError, match="'intermediate_size' is missing"):
        read_hf_config(_write_config(tmp_path / "miss", intermediate_size=None))
    with pytest.raises(ModelFileError, match="'yarn'"):
        read_hf_config(_write_config(tmp_path / "yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ModelFileError, match="multiple of n_kv_heads"):
        read_hf_config(_write_config(tmp_path / "gqa", num_key_value_heads=3))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        read_hf_config(tmp_path / "bad")
    with pytest.raises(ModelFileError, match="does not exist"):
        read_hf_config(tmp_path / "nowhere")


def test_weight_errors(tiny_hf_dir, tmp_path: Path) -> None:
    cfg = read_hf_config(tiny_hf_dir)
    spec = ShardSpec.full(cfg)
    empty = _write_config(tmp_path / "empty")
    with pytest.raises(ModelFileError, match="no \\*.safetensors"):
        load_hf_weights(empty, cfg, spec)
    d = tmp_path / "trunc"
    shutil.copytree(tiny_hf_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        load_hf_weights(d, cfg, spec)
    # A config that disagrees with the tensors names the tensor and both shapes.
    wrong = read_hf_config(_write_config(tmp_path / "wrong", num_hidden_layers=4, hidden_size=96,
                                         num_attention_heads=6, num_key_value_heads=3, intermediate_size=100,
                                         vocab_size=1024))
    shutil.copy(tiny_hf_dir / "model.safetensors", tmp_path / "wrong")
    with pytest.raises(ModelFileError, match=r"gate_proj.weight.*\[128, 96\].*\[100, 96\]"):
        load_hf_weights(tmp_path / "wrong", wrong, ShardSpec.full(wrong))
    with pytest.raises(ValueError, match="layers"):
        load_hf_weights(tiny_hf_dir, cfg, ShardSpec((0, 9), (0, 3), (0, 128), True, True))


def test_tiny_gguf_is_what_transformers_loads(tiny_gguf_factory) -> None:
    """The fixture's layout claim: transformers' GGUF loader (which un-permutes llama q/k) recovers exactly the HF
    state dict, for llama (permuted q/k) and qwen2 (not permuted, biases), and the model computes varied logits."""
    transformers = pytest.importorskip("transformers")
    for arch in ("llama", "qwen2"):
        path = tiny_gguf_factory(vocab=1024, arch=arch)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
        sd = tiny_llama_hf_state_dict(vocab=1024, attention_bias=arch == "qwen2")
        msd = model.state_dict()
        for name, value in sd.items():
            assert torch.equal(msd[name], torch.from_numpy(value)), (arch, name)
        with torch.no_grad():
            logits = model(torch.tensor([[1, 100, 200, 300, 400]])).logits[0]
        assert torch.isfinite(logits).all()
        assert 0.5 < logits.std().item() < 10  # neither flat nor saturated
        assert len(set(logits.argmax(-1).tolist())) > 1  # different positions predict different tokens


@pytest.mark.parametrize(
    "dtype,tol",
    [("bf16", 8e-3), ("q8_0", 1e-2), ("q4_1", 0.13), ("q4_k", None), ("q6_k", None)],
)
def test_tiny_gguf_quantized_variants(tiny_gguf_factory, dtype: str, tol: float | None) -> None:
    """Quantised tiny GGUFs (for the dequantisation tests) load in transformers; quantiser types stay within
    their rounding error of the float weights, K-quant types (random blocks) have the requested weight scale."""
    transformers = pytest.importorskip("transformers")
    shape = dict(n_layers=1, hidden=256, n_heads=8, n_kv_heads=2, ffn=512, vocab=1024)
    path = tiny_gguf_factory(dtype=dtype, **shape)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    sd = tiny_llama_hf_state_dict(**shape)
    msd = model.state_dict()
    name = "model.layers.0.mlp.gate_proj.weight"
    if tol is not None:
        w = torch.from_numpy(sd[name])
        assert (msd[name] - w).abs().max().item() <= tol * w.abs().max().item()
        assert torch.equal(msd["model.norm.weight"], torch.from_numpy(sd["model.norm.weight"]))  # 1-D stays F32
    else:
        std = msd[name].std().item()
        assert 0.04 < std < 0.16 and torch.isfinite(msd[name]).all()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
