"""HF model directories (config.json + *.safetensors) → `ModelConfig` and the tensors one shard owns.

Same contract as the GGUF reader in weights.py: canonical names and (out, in) layouts of contracts.md. HF
checkpoints already store q/k in rotate_half order (llama.cpp's permute happens only on conversion to GGUF), so
nothing is un-permuted here. `safe_open(...).get_slice(name)[rows]` reads only the bytes of the requested rows or
columns from the memory-mapped file, so a shard's RSS scales with its share.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from .errors import ModelFileError, UnsupportedArchitectureError
from .moe import holds_shared_expert
from .shard import ShardSpec

log = logging.getLogger(__name__)

# HF `architectures[0]` → our arch. Mistral (v0.1-v0.3) is the Llama graph (transformers' MistralModel differs
# only by the optional sliding window); Qwen2 adds q/k/v biases.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "Qwen2MoeForCausalLM": "qwen2moe",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(path, "file does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _rope(path: Path, c: dict[str, Any]) -> tuple[float, RopeScaling]:
    """rope_theta and scaling from config.json: transformers ≥ 5 writes `rope_parameters` (with rope_theta inside),
    older files `rope_theta` + `rope_scaling` (key `rope_type`, or `type` before 4.45)."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or params
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return theta, RopeScaling()
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return theta, RopeScaling("linear", factor)
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3", factor, float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0)),
            int(scaling.get("original_max_position_embeddings", 8192)),
        )
    if kind in ("longrope", "su"):  # ("su": Phi-3's first name for it; transformers' Phi3Config maps it alike)
        try:
            return theta, _longrope(scaling, c)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(path, f"bad LongRoPE rope_scaling ({exc!r})") from None
    raise ModelFileError(path, f"RoPE scaling type {kind!r} is not supported (supported: default, linear, llama3, "
                               "longrope)")


def _longrope(scaling: dict[str, Any], c: dict[str, Any]) -> RopeScaling:
    """Phi-3's LongRoPE from config.json, as transformers' `_compute_longrope_parameters` reads it: the original
    context from the scaling dict or the top-level `original_max_position_embeddings` (Phi-3's own configs),
    factor = max_position_embeddings / original unless given, attention factor sqrt(1 + ln(factor) / ln(original))
    (1 for factor <= 1) unless given."""
    ctx = int(c.get("max_position_embeddings", 2048))
    orig = int(scaling.get("original_max_position_embeddings") or c.get("original_max_position_embeddings") or ctx)
    factor = float(scaling.get("factor") or ctx / orig)
    attn = scaling.get("attention_factor")
    if attn is None:
        attn = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
    return RopeScaling("longrope", factor, original_context_length=orig, attention_factor=float(attn),
                       long_factor=tuple(float(f) for f in scaling["long_factor"]),
                       short_factor=tuple(float(f) for f in scaling["short_factor"]))


def read_hf_config(directory: str | Path) -> ModelConfig:
    """ModelConfig from an HF directory's config.json (Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Gemma 2 / Gemma 3
    text / Qwen3-MoE / Qwen2-MoE)."""
    d = Path(directory)
    path = d / "config.json"
    c = _load_json(path)
    archs = c.get("architectures") or []
    name = archs[0] if archs else str(c.get("model_type", "?"))
    arch = HF_ARCHITECTURES.get(name) if archs else _MODEL_TYPES.get(str(c.get("model_type")))
    if arch is None:
        raise UnsupportedArchitectureError(path, name, tuple(HF_ARCHITECTURES))
    assert arch in SUPPORTED_ARCHITECTURES
    if arch == "llama" and (c.get("attention_bias") or c.get("mlp_bias")):
        # Llama's attention_bias also biases o_proj, which the canonical weights have no slot for.
        raise ModelFileError(path, "attention_bias/mlp_bias Llama variants are not supported")
    if c.get("use_sliding_window") or (arch == "llama" and c.get("sliding_window")):
        log.warning("%s: sliding-window attention (window %s) is ignored; outputs match only within the window",
                    path, c.get("sliding_window"))
    if arch == "gemma3" and "full_attention" in (c.get("rope_parameters") or {}):
        # per attention type (transformers' Gemma3TextConfig): the global layers' base and scaling here
        theta, scaling = _rope(path, {"rope_parameters": c["rope_parameters"]["full_attention"]})
    else:
        theta, scaling = _rope(path, c)
    try:
        n_heads = int(c["num_attention_heads"])
        return ModelConfig(
            arch=arch,
            n_layers=int(c["num_hidden_layers"]),
            hidden_size=int(c["hidden_size"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            # an MoE model's FFN width is one expert's (ModelConfig.n_expert)
            ffn_size=int(c["moe_intermediate_size"] if arch in _MOE else c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            context_length=int(c.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (and none on o_proj); Qwen2-MoE by its qkv_bias (default true)
            attention_bias=arch == "qwen2" or (arch == "qwen2moe" and bool(c.get("qkv_bias", True))),
            head_dim=int(c.get("head_dim") or 0),
            rope_scaling=scaling,
            name=str(c.get("_name_or_path") or d.name),
            **_family_fields(path, arch, c),
        )
    except KeyError as exc:
        raise ModelFileError(path, f"required key {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(path, f"inconsistent model config: {exc}") from None


_MOE = ("qwen3moe", "qwen2moe")


def _moe_fields(path: Path, arch: str, c: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE / Qwen2-MoE (transformers' Qwen3MoeConfig / Qwen2MoeConfig): experts in every layer (a dense MLP in
    some layers, `mlp_only_layers` or a `decoder_sparse_step` > 1, is not supported), the router's top-k
    renormalised per `norm_topk_prob` (transformers' default false; Qwen3-30B-A3B's config sets it true), and
    Qwen2-MoE's shared expert (`shared_expert_intermediate_size`, with its sigmoid gate)."""
    if c.get("mlp_only_layers") or int(c.get("decoder_sparse_step", 1)) != 1:
        raise ModelFileError(path, "MoE models with dense layers (mlp_only_layers / decoder_sparse_step > 1) are "
                                   "not supported")
    shared = int(c.get("shared_expert_intermediate_size") or 0) if arch == "qwen2moe" else 0
    return dict(
        qk_norm=arch == "qwen3moe",
        n_expert=int(c.get("num_experts") or c["num_local_experts"]), n_expert_used=int(c["num_experts_per_tok"]),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)), shared_expert_ffn=shared,
    )


def _family_fields(path: Path, arch: str, c: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of the families beyond the Llama block, from their config.json (transformers' names)."""
    if arch in ("qwen3", "phi3", "qwen3moe") and (c.get("attention_bias") or c.get("mlp_bias")):
        raise ModelFileError(path, f"attention_bias/mlp_bias {arch} variants are not supported")
    if arch in _MOE:
        return _moe_fields(path, arch, c)
    if arch == "phi3" and float(c.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelFileError(path, "partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    if arch == "qwen3":
        return {"qk_norm": True}
    if arch not in ("gemma2", "gemma3"):
        return {}
    hidden, types = int(c["hidden_size"]), c.get("layer_types")
    pattern = int(c.get("sliding_window_pattern", 2 if arch == "gemma2" else 6))
    if types:  # "sliding_attention" / "full_attention" per layer: must repeat a (k-1 sliding, 1 full) cycle
        pattern = types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1
        if any((t == "sliding_attention") != ((i + 1) % pattern != 0) for i, t in enumerate(types)):
            raise ModelFileError(path, f"layer_types {types} is not a periodic sliding/full pattern")
    local = ((c.get("rope_parameters") or {}).get("sliding_attention") or {}) if arch == "gemma3" else {}
    default_local = 10000.0 if arch == "gemma3" else 0.0  # gemma2: one base for every layer (0 = rope_theta)
    return dict(
        qk_norm=arch == "gemma3", post_norms=True,
        attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(c.get("final_logit_softcapping") or 0.0), activation="gelu_tanh", embed_scale=float(torch.tensor(hidden ** 0.5)),
        attention_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
        sliding_window=int(c.get("sliding_window") or 0), sliding_window_pattern=pattern,
        rope_local_theta=float(local.get("rope_theta", c.get("rope_local_base_freq", default_local))),
    )


class _SafetensorsDir:
    """Name → file lookup over one or many safetensors files, with sliced reads."""

    def __init__(self, d: Path, dtype: torch.dtype) -> None:
        self.dir, self.dtype = d, dtype
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFileError(index, "no 'weight_map' object")
            self.files = {str(k): d / str(v) for k, v in weight_map.items()}
        else:
            files = sorted(d.glob("*.safetensors"))
            if not files:
                raise ModelFileError(d, "no *.safetensors files (only safetensors checkpoints are supported)")
            self.files = {}
            for f in files:
                with self._open(f) as h:
                    self.files.update(dict.fromkeys(h.keys(), f))
        self._handles: dict[Path, Any] = {}

    def _open(self, f: Path) -> Any:
        if not f.is_file():
            raise ModelFileError(f, "file does not exist (listed in model.safetensors.index.json)")
        try:
            return safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f, f"corrupt or unreadable safetensors file ({exc})") from None

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def has(self, name: str) -> bool:
        return name in self.files

    def _slice(self, name: str) -> tuple[Any, Path]:
        f = self.files.get(name)
        if f is None:
            raise ModelFileError(self.dir, f"tensor {name!r} is missing")
        if f not in self._handles:
            self._handles[f] = self._open(f).__enter__()
        return self._handles[f].get_slice(name), f

    def read(self, name: str, shape: tuple[int, ...], rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` (expected `shape`), only rows [r0, r1) and/or columns [c0, c1), cast to `dtype` (default:
        the directory's)."""
        sl, f = self._slice(name)
        actual = tuple(sl.get_shape())
        if actual != shape:
            raise ModelFileError(f, f"tensor {name!r} has shape {list(actual)}, expected {list(shape)} from config.json")
        r = slice(*rows) if rows is not None else slice(None)
        try:
            t = sl[r] if len(shape) == 1 else sl[r, slice(*cols) if cols is not None else slice(None)]
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f, f"cannot read tensor {name!r} ({exc})") from None
        return t.to(dtype or self.dtype).contiguous()


def load_hf_weights(directory: str | Path, cfg: ModelConfig, spec: ShardSpec,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors shard `spec` owns, canonical names (contracts.md), read sliced from the safetensors files."""
    spec.validate(cfg)
    src = _SafetensorsDir(Path(directory), dtype)
    try:
        return _load(src, cfg, spec)
    finally:
        src.close()


def _load(src: _SafetensorsDir, cfg: ModelConfig, spec: ShardSpec) -> dict[str, torch.Tensor]:
    hidden, hd, vocab = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    h0, h1 = spec.heads(cfg)
    k0, k1 = spec.kv_heads
    f0, f1 = spec.ffn
    # Most checkpoints prefix the decoder with "model."; a bare LlamaModel save does not.
    pre = "model." if src.has("model.embed_tokens.weight") or not src.has("embed_tokens.weight") else ""
    out: dict[str, torch.Tensor] = {}
    if spec.has_embedding:
        out["embed"] = src.read(pre + "embed_tokens.weight", (vocab, hidden))
    # Gemma's RMSNorm scales by (1 + w) (transformers' Gemma3RMSNorm): stored here as 1 + w, as llama.cpp's
    # converter does, so the engine's x·w applies to every family.
    shift = 1.0 if cfg.arch in ("gemma2", "gemma3") else 0.0

    def norm(name: str, n: int) -> torch.Tensor:
        w = src.read(name, (n,))
        return (w.float() + shift).to(w.dtype) if shift else w

    if spec.has_output:
        out["norm"] = norm(pre + "norm.weight", hidden)
        # Tied checkpoints usually omit lm_head.weight (transformers re-ties on load).
        if cfg.tie_embeddings or not src.has("lm_head.weight"):
            if not cfg.tie_embeddings:
                raise ModelFileError(src.dir, "tensor 'lm_head.weight' is missing and tie_word_embeddings is false")
            out["lm_head"] = out["embed"] if "embed" in out else src.read(pre + "embed_tokens.weight", (vocab, hidden))
        else:
            out["lm_head"] = src.read("lm_head.weight", (vocab, hidden))
    q_rows, kv_rows = (h0 * hd, h1 * hd), (k0 * hd, k1 * hd)
    for i in range(*spec.layers):
        b, n = f"{pre}layers.{i}.", f"layers.{i}."
        out[n + "attn_norm"] = norm(b + "input_layernorm.weight", hidden)
        if cfg.post_norms:  # gemma: the FFN's own pre-norm; post_attention_layernorm normalises attention's output
            out[n + "ffn_norm"] = norm(b + "pre_feedforward_layernorm.weight", hidden)
            out[n + "post_attn_norm"] = norm(b + "post_attention_layernorm.weight", hidden)
            out[n + "post_ffn_norm"] = norm(b + "post_feedforward_layernorm.weight", hidden)
        else:
            out[n + "ffn_norm"] = norm(b + "post_attention_layernorm.weight", hidden)
        if cfg.qk_norm:
            out[n + "q_norm"] = norm(b + "self_attn.q_norm.weight", hd)
            out[n + "k_norm"] = norm(b + "self_attn.k_norm.weight", hd)
        if cfg.arch == "phi3":  # fused qkv_proj (rows q | k | v) and gate_up_proj (rows gate | up)
            q_dim, kv_dim, F = cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.ffn_size
            qkv, gu = (q_dim + 2 * kv_dim, hidden), (2 * F, hidden)
            out[n + "q"] = src.read(b + "self_attn.qkv_proj.weight", qkv, rows=q_rows)
            out[n + "k"] = src.read(b + "self_attn.qkv_proj.weight", qkv, rows=(q_dim + kv_rows[0], q_dim + kv_rows[1]))
            out[n + "v"] = src.read(b + "self_attn.qkv_proj.weight", qkv,
                                    rows=(q_dim + kv_dim + kv_rows[0], q_dim + kv_dim + kv_rows[1]))
            out[n + "o"] = src.read(b + "self_attn.o_proj.weight", (hidden, q_dim), cols=q_rows)
            out[n + "gate"] = src.read(b + "mlp.gate_up_proj.weight", gu, rows=(f0, f1))
            out[n + "up"] = src.read(b + "mlp.gate_up_proj.weight", gu, rows=(F + f0, F + f1))
            out[n + "down"] = src.read(b + "mlp.down_proj.weight", (hidden, F), cols=(f0, f1))
            continue
        # Column-parallel (output rows): q by query heads, k/v by KV heads, gate/up by FFN columns.
        out[n + "q"] = src.read(b + "self_attn.q_proj.weight", (cfg.n_heads * hd, hidden), rows=q_rows)
        out[n + "k"] = src.read(b + "self_attn.k_proj.weight", (cfg.n_kv_heads * hd, hidden), rows=kv_rows)
        out[n + "v"] = src.read(b + "self_attn.v_proj.weight", (cfg.n_kv_heads * hd, hidden), rows=kv_rows)
        if cfg.attention_bias:
            out[n + "q_bias"] = src.read(b + "self_attn.q_proj.bias", (cfg.n_heads * hd,), rows=q_rows)
            out[n + "k_bias"] = src.read(b + "self_attn.k_proj.bias", (cfg.n_kv_heads * hd,), rows=kv_rows)
            out[n + "v_bias"] = src.read(b + "self_attn.v_proj.bias", (cfg.n_kv_heads * hd,), rows=kv_rows)
        # Row-parallel (input columns): o by query heads, down by FFN columns.
        out[n + "o"] = src.read(b + "self_attn.o_proj.weight", (hidden, cfg.n_heads * hd), cols=q_rows)
        if cfg.is_moe:  # router + this shard's experts (+ the shared expert on one shard of the stage)
            out.update(_moe_layer(src, cfg, spec, b + "mlp.", n))
            continue
        out[n + "gate"] = src.read(b + "mlp.gate_proj.weight", (cfg.ffn_size, hidden), rows=(f0, f1))
        out[n + "up"] = src.read(b + "mlp.up_proj.weight", (cfg.ffn_size, hidden), rows=(f0, f1))
        out[n + "down"] = src.read(b + "mlp.down_proj.weight", (hidden, cfg.ffn_size), cols=(f0, f1))
    log.debug("loaded %d tensors of %s for shard %s", len(out), src.dir, spec)
    return out


def _moe_layer(src: _SafetensorsDir, cfg: ModelConfig, spec: ShardSpec, mlp: str, n: str) -> dict[str, torch.Tensor]:
    """One MoE layer's share under the canonical names of model/moe.py (load_moe_layer, load_shared_expert): the
    router `mlp.gate` (n_expert, hidden) in float32, per expert e of the shard `mlp.experts.{e}.gate_proj|up_proj`
    rows and `down_proj` columns of its FFN range, and Qwen2-MoE's `mlp.shared_expert.*` with the sigmoid gate
    `mlp.shared_expert_gate` (1, hidden) where the shard holds it. (Checkpoints store each expert's matrices
    apart, as transformers' save_pretrained writes them too.)"""
    hidden, F = cfg.hidden_size, cfg.ffn_size
    cols = spec.ffn
    out = {n + "router": src.read(mlp + "gate.weight", (cfg.n_expert, hidden), dtype=torch.float32)}
    for e in range(*spec.expert_range(cfg)):
        x = f"{mlp}experts.{e}."
        out[f"{n}experts.{e}.gate"] = src.read(x + "gate_proj.weight", (F, hidden), rows=cols)
        out[f"{n}experts.{e}.up"] = src.read(x + "up_proj.weight", (F, hidden), rows=cols)
        out[f"{n}experts.{e}.down"] = src.read(x + "down_proj.weight", (hidden, F), cols=cols)
    if holds_shared_expert(cfg, spec):
        S, s = cfg.shared_expert_ffn, mlp + "shared_expert."
        out[n + "shared.gate"] = src.read(s + "gate_proj.weight", (S, hidden))
        out[n + "shared.up"] = src.read(s + "up_proj.weight", (S, hidden))
        out[n + "shared.down"] = src.read(s + "down_proj.weight", (hidden, S))
        out[n + "shared.gate_inp"] = src.read(mlp + "shared_expert_gate.weight", (1, hidden),
                                              dtype=torch.float32).reshape(hidden)
    return out
