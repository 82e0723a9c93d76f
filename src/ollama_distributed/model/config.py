"""Model hyper-parameters, independent of where they were read from (GGUF metadata or HF config.json).

Readers live in `weights.py` (`read_config(path)`); this module only describes and checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# llama also covers Mistral-style files (model/weights.py _ARCH_ALIASES).
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen3moe", "qwen2moe")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    kind: "none" | "linear" | "llama3" (Llama 3.1's smooth low/high-frequency blend, see
    transformers `_compute_llama3_parameters`) | "longrope" (Phi-3's 128k LongRoPE, below) | "yarn" (not yet
    supported by the engine).

    longrope (Ding et al., "LongRoPE", 2024; transformers `_compute_longrope_parameters`, llama.cpp's
    `rope_factors_long/short` tensors): every frequency i is divided by `long_factor[i]` when the context a
    sequence may reach exceeds `original_context_length`, else by `short_factor[i]`; cos and sin are multiplied by
    `attention_factor` (sqrt(1 + ln(factor) / ln(original_context_length)) from the converter or config, factor =
    context_length / original_context_length, kept here for display and planning).
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192
    attention_factor: float = 1.0
    long_factor: tuple[float, ...] = ()
    short_factor: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("none", "linear", "llama3", "longrope", "yarn"):
            raise ValueError(f"unknown rope scaling kind {self.kind!r}")
        if self.factor <= 0 or self.attention_factor <= 0:
            raise ValueError(f"rope scaling factors must be > 0, got {self.factor} / {self.attention_factor}")
        if (self.kind == "longrope") != bool(self.long_factor) or len(self.long_factor) != len(self.short_factor):
            raise ValueError(f"longrope needs long and short factors of one length (and only longrope has them), got "
                             f"{len(self.long_factor)} / {len(self.short_factor)} for kind {self.kind!r}")
        if any(f <= 0 for f in self.long_factor + self.short_factor):
            raise ValueError("longrope factors must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine and the scheduler need to know about a Llama-family model.

    Fields:
      arch: one of SUPPORTED_ARCHITECTURES (GGUF `general.architecture`; "mistral" is read as "llama").
      n_layers: transformer blocks.
      hidden_size: residual stream width (d_model).
      n_heads: query heads; n_kv_heads: key/value heads (GQA groups = n_heads // n_kv_heads).
      head_dim: per-head width (hidden_size // n_heads unless the model says otherwise).
      ffn_size: MLP intermediate width (gate/up rows, down columns).
      vocab_size: rows of the embedding and the output head.
      context_length: trained context (upper bound for num_ctx).
      rope_theta: RoPE base frequency; rope_scaling: see RopeScaling.
      rms_norm_eps: RMSNorm epsilon.
      tie_embeddings: output head shares the token embedding matrix.
      attention_bias: q/k/v projections carry a bias (qwen2).
      name: human-readable model name from metadata ("" if unknown).
      qk_norm: per-head RMSNorm of q and k before RoPE (qwen3, qwen3moe: `attn_q_norm` / `attn_k_norm`).
      n_expert: experts per mixture-of-experts FFN (0 = dense FFN); n_expert_used: experts each token is routed to
        (top-k); for an MoE model `ffn_size` is one expert's FFN width (GGUF `expert_feed_forward_length`), so a
        ShardSpec's `ffn` range cuts every expert's columns alike (model/moe.py).
      norm_topk_prob: renormalise the top-k router probabilities to sum to 1 (Qwen3-MoE; llama.cpp qwen3moe.cpp).
      shared_expert_ffn: width of the shared expert every token also runs, scaled by a sigmoid gate (qwen2moe's
        `ffn_*_shexp`; 0 = none).
      post_norms: RMSNorm of the attention and FFN outputs before each residual add (gemma3's
        post_attention_norm / post_ffw_norm).
      activation: the gate's nonlinearity, "silu" (SwiGLU) or "gelu_tanh" (GeGLU with tanh-approximated GELU,
        gemma's `gelu_pytorch_tanh`).
      embed_scale: the token embedding is multiplied by this (gemma: sqrt(hidden_size)).
      attention_scale: softmax(q·k * attention_scale); 0 = head_dim ** -0.5.
      sliding_window: keys a sliding-window layer sees, the query's own position included (0 = none);
      sliding_window_pattern: every `pattern`-th layer (i + 1 ≡ 0 mod pattern) is global, the others slide
        (gemma3: 6, llama.cpp's `set_swa_pattern(6)`, transformers' default `layer_types`); 1 = all global.
      rope_local_theta: RoPE base of the sliding-window layers (gemma3: 10000; 0 = rope_theta). The global
        layers use rope_theta and rope_scaling, the local ones no scaling (transformers' Gemma3 rope_parameters).
      attn_softcap / final_softcap: gemma2's soft-capping, cap · tanh(x / cap), of the attention scores and of the
        output logits (0 = none).
    """

    arch: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    head_dim: int = 0  # 0 = hidden_size // n_heads (filled in __post_init__)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    name: str = ""
    qk_norm: bool = False
    n_expert: int = 0
    n_expert_used: int = 0
    norm_topk_prob: bool = True
    shared_expert_ffn: int = 0
    post_norms: bool = False
    activation: str = "silu"
    embed_scale: float = 1.0
    attention_scale: float = 0.0  # 0 = head_dim ** -0.5 (filled in __post_init__)
    sliding_window: int = 0
    sliding_window_pattern: int = 1
    rope_local_theta: float = 0.0  # 0 = rope_theta (filled in __post_init__)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for fname in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "ffn_size", "vocab_size", "context_length"):
            if getattr(self, fname) <= 0:
                raise ValueError(f"{fname} must be > 0, got {getattr(self, fname)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_expert < 0 or (self.n_expert and not 0 < self.n_expert_used <= self.n_expert):
            raise ValueError(f"need 0 < n_expert_used ({self.n_expert_used}) <= n_expert ({self.n_expert})")
        if self.head_dim == 0:
            if self.hidden_size % self.n_heads:
                raise ValueError(f"hidden_size {self.hidden_size} not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        if self.rope_scaling.kind == "longrope" and len(self.rope_scaling.long_factor) != self.head_dim // 2:
            raise ValueError(f"longrope needs head_dim / 2 = {self.head_dim // 2} factors per table, got "
                             f"{len(self.rope_scaling.long_factor)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.sliding_window < 0 or self.sliding_window_pattern < 1:
            raise ValueError(f"bad sliding window {self.sliding_window} / pattern {self.sliding_window_pattern}")
        if self.attention_scale == 0.0:
            object.__setattr__(self, "attention_scale", self.head_dim ** -0.5)
        if self.rope_local_theta == 0.0:
            object.__setattr__(self, "rope_local_theta", self.rope_theta)

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends over only the last `sliding_window` positions (and uses the local RoPE base)."""
        return self.sliding_window > 0 and (layer + 1) % self.sliding_window_pattern != 0

    def kv_positions(self, layer: int, context: int) -> int:
        """Positions of `layer`'s KV cache a sequence of `context` tokens needs (a sliding layer: its window)."""
        return min(context, self.sliding_window) if self.is_sliding(layer) else context

    @property
    def is_moe(self) -> bool:
        """Every layer's FFN is a mixture of experts."""
        return self.n_expert > 0

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads
