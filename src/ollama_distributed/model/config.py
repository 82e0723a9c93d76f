"""Model hyper-parameters, independent of where they were read from (GGUF metadata or HF config.json).

Readers live in `weights.py` (`read_config(path)`); this module only describes and checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    kind: "none" | "linear" | "llama3" (Llama 3.1's smooth low/high-frequency blend, see
    transformers `_compute_llama3_parameters`) | "yarn" (not yet supported by the engine).
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("none", "linear", "llama3", "yarn"):
            raise ValueError(f"unknown rope scaling kind {self.kind!r}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine and the scheduler need to know about a Llama-family model.

    Fields:
      arch: GGUF `general.architecture` ("llama" or "qwen2").
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
        if self.head_dim == 0:
            if self.hidden_size % self.n_heads:
                raise ValueError(f"hidden_size {self.hidden_size} not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads
