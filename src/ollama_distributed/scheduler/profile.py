"""What the planner needs to know about a model: sizes of the pieces it can split, and their cost.

A Llama-family layer (llama, qwen2) is split along two axes (Megatron-LM, Shoeybi et al. 2019, §3):
  * attention by KV group: one KV head with its `group_size` query heads; the q/k/v rows and the
    matching o-projection columns of a group travel together (GQA: Ainslie et al. 2023);
  * MLP by FFN column: one row of gate and up plus the matching column of down.
Everything else in a layer (two RMSNorm vectors of `hidden` each) is replicated on every shard.

Parameter counts per layer (H = hidden, d = head_dim, g = group_size, A = n_kv_heads, F = ffn):
  attention unit (one KV group): q g·d·H + k d·H + v d·H + o H·g·d = (2g + 2)·d·H  (+ (g + 2)·d bias)
  FFN unit (one column):         gate H + up H + down H = 3H
  layer: A·attention unit + F·FFN unit + 2H (norms)
FLOPs per token: 2 per multiply-accumulate of every weight (Kaplan et al. 2020, "Scaling Laws for Neural
Language Models", Table 1), plus attention over a context of c tokens: QKᵀ and A·V each c·d MACs per
query head, so 4·c·d FLOPs per query head (Kaplan counts QKᵀ only; A·V costs the same and is included here).
KV cache per token per layer: K and V rows of each KV head, 2·d elements per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig

# Bytes per weight element of the compute dtypes the planner knows. Quantized GGUF types count their
# block scales (Q8_0: 34 bytes per 32 weights, Q4_0: 18/32, Q4_1: 20/32 — ggml's block layouts).
DTYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    # Our int4 path (model/quant.py): 4-bit codes + a bf16 scale and zero per 32 weights; its embedding and
    # output head are larger (EMBED_BYTES).
    "int4": 0.5 + 4 / 32,
}
# Bytes per embedding / output-head element where they differ from the layers' (dtype → bytes).
# int4: the head's 4-bit ranking rows (0.625 B) + its float16 table for refining the top logits (2 B), which a tied
# embedding shares; an embedding-only shard holds just a 2-byte table, so this slightly over-counts it
# (model/quant.py).
EMBED_BYTES: dict[str, float] = {"int4": 2.625}
# Bytes per activation and KV-cache element where they are not the weights' dtype: the int4 path keeps its residual
# stream, attention and cache in float32 (model/transformer.py, ModelShard.__init__).
STREAM_BYTES: dict[str, float] = {"int4": 4.0}


@dataclass(frozen=True)
class ModelProfile:
    """Sizes of one model in one compute dtype.

    name: label used in plans. n_layers .. vocab_size: as ModelConfig. tie_embeddings: output head is the
    embedding matrix. attention_bias: q/k/v carry biases (qwen2). weight_bytes: bytes per weight element in
    the compute dtype. kv_bytes: bytes per KV-cache element. act_bytes: bytes per activation element sent
    between stages / all-reduced. context_length: trained context (workloads longer than it are rejected).
    embed_bytes: bytes per element of the embedding and output-head matrices where they differ from weight_bytes
    (0 = the same).
    """

    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    context_length: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    weight_bytes: float = 2.0
    kv_bytes: float = 2.0
    act_bytes: float = 2.0
    embed_bytes: float = 0.0

    def __post_init__(self) -> None:
        for f in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "head_dim", "ffn_size", "vocab_size",
                  "context_length"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelProfile.{f} must be > 0, got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        for f in ("weight_bytes", "kv_bytes", "act_bytes"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelProfile.{f} must be > 0, got {getattr(self, f)}")

    # --- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, dtype: str = "f16", name: str | None = None,
                    kv_dtype: str | None = None) -> "ModelProfile":
        """Profile of `cfg` computing in `dtype` (a key of DTYPE_BYTES); KV cache in kv_dtype (default: the
        compute dtype, or f16 for quantized weights, as llama.cpp keeps its cache in f16)."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        wb = DTYPE_BYTES[dtype]
        act = STREAM_BYTES.get(dtype, wb if wb >= 2 else 2.0)
        kvb = DTYPE_BYTES[kv_dtype] if kv_dtype else act
        return cls(
            name=name or cfg.name or f"{cfg.arch}-{cfg.n_layers}l",
            n_layers=cfg.n_layers, hidden_size=cfg.hidden_size, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, ffn_size=cfg.ffn_size, vocab_size=cfg.vocab_size,
            context_length=cfg.context_length, tie_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.attention_bias, weight_bytes=wb, kv_bytes=kvb, act_bytes=act,
            embed_bytes=EMBED_BYTES.get(dtype, 0.0),
        )

    # --- granularity --------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    # --- parameters (elements) ----------------------------------------------------------------------
    @property
    def attn_unit_params(self) -> int:
        """Weights of one KV group in one layer: (2g + 2)·d·H (+ (g + 2)·d biases)."""
        g, d, h = self.group_size, self.head_dim, self.hidden_size
        return (2 * g + 2) * d * h + ((g + 2) * d if self.attention_bias else 0)

    @property
    def ffn_unit_params(self) -> int:
        """Weights of one FFN column in one layer: gate row + up row + down column."""
        return 3 * self.hidden_size

    @property
    def layer_norm_params(self) -> int:
        """attn_norm + ffn_norm, replicated on every tensor-parallel shard."""
        return 2 * self.hidden_size

    @property
    def layer_params(self) -> int:
        return self.n_kv_heads * self.attn_unit_params + self.ffn_size * self.ffn_unit_params + self.layer_norm_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Output head + final norm (the head matrix is the embedding when tied; see head_extra_bytes)."""
        return self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def total_params(self) -> int:
        head = self.hidden_size if self.tie_embeddings else self.head_params
        return self.n_layers * self.layer_params + self.embedding_params + head

    # --- bytes ---------------------------------------------------------------------------------------
    @property
    def attn_unit_bytes(self) -> float:
        return self.attn_unit_params * self.weight_bytes

    @property
    def ffn_unit_bytes(self) -> float:
        return self.ffn_unit_params * self.weight_bytes

    @property
    def layer_norm_bytes(self) -> float:
        return self.layer_norm_params * self.weight_bytes

    @property
    def layer_bytes(self) -> float:
        """All weights of one layer."""
        return self.layer_params * self.weight_bytes

    @property
    def _matrix_bytes(self) -> float:
        """Bytes per element of the embedding / output-head matrices."""
        return self.embed_bytes or self.weight_bytes

    @property
    def embedding_bytes(self) -> float:
        return self.embedding_params * self._matrix_bytes

    @property
    def head_bytes(self) -> float:
        """Output head + final norm as stored on a node that does NOT also hold the embedding."""
        return self.vocab_size * self.hidden_size * self._matrix_bytes + self.hidden_size * self.weight_bytes

    def head_extra_bytes(self, holds_embedding: bool) -> float:
        """Bytes the output role adds to a node: a tied head on the node that already holds the embedding
        costs only the final norm (the matrix is shared); otherwise its own copy."""
        if self.tie_embeddings and holds_embedding:
            return self.hidden_size * self.weight_bytes
        return self.head_bytes

    @property
    def kv_unit_bytes_per_token(self) -> float:
        """KV cache of one KV head in one layer for one token: K and V rows, 2·d elements."""
        return 2 * self.head_dim * self.kv_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> float:
        return self.n_kv_heads * self.kv_unit_bytes_per_token

    @property
    def hidden_bytes_per_token(self) -> float:
        """Residual-stream activation sent between pipeline stages (and all-reduced in a TP group)."""
        return self.hidden_size * self.act_bytes

    @property
    def total_weight_bytes(self) -> float:
        return self.n_layers * self.layer_bytes + self.embedding_bytes + self.head_extra_bytes(True)

    # --- FLOPs per token ------------------------------------------------------------------------------
    def attn_unit_flops(self, context: float) -> float:
        """One token through one KV group of one layer, attending over `context` tokens."""
        return 2.0 * self.attn_unit_params + 4.0 * self.group_size * self.head_dim * context

    @property
    def ffn_unit_flops(self) -> float:
        return 2.0 * self.ffn_unit_params

    def layer_flops(self, context: float) -> float:
        return self.n_kv_heads * self.attn_unit_flops(context) + self.ffn_size * self.ffn_unit_flops

    @property
    def head_flops(self) -> float:
        """Logits of one token."""
        return 2.0 * self.vocab_size * self.hidden_size

    def to_dict(self) -> dict[str, object]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _cfg(arch: str, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int, ctx: int,
         tied: bool = False, bias: bool = False, name: str = "") -> ModelConfig:
    return ModelConfig(arch=arch, n_layers=layers, hidden_size=hidden, n_heads=heads, n_kv_heads=kv,
                       ffn_size=ffn, vocab_size=vocab, context_length=ctx, tie_embeddings=tied,
                       attention_bias=bias, name=name)


# Published hyper-parameters (the models' config.json files on the Hugging Face hub).
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": _cfg("llama", 30, 576, 9, 3, 1536, 49152, 8192, tied=True, name="smollm2-135m"),
    "qwen2-0.5b": _cfg("qwen2", 24, 896, 14, 2, 4864, 151936, 32768, tied=True, bias=True, name="qwen2-0.5b"),
    "llama3.2-1b": _cfg("llama", 16, 2048, 32, 8, 8192, 128256, 131072, tied=True, name="llama3.2-1b"),
    "llama3.2-3b": _cfg("llama", 28, 3072, 24, 8, 8192, 128256, 131072, tied=True, name="llama3.2-3b"),
    "llama-7b": _cfg("llama", 32, 4096, 32, 32, 11008, 32000, 4096, name="llama-7b"),
    "llama-13b": _cfg("llama", 40, 5120, 40, 40, 13824, 32000, 4096, name="llama-13b"),
    "llama-70b": _cfg("llama", 80, 8192, 64, 8, 28672, 32000, 4096, name="llama-70b"),
    "llama3-8b": _cfg("llama", 32, 4096, 32, 8, 14336, 128256, 8192, name="llama3-8b"),
    "llama3-70b": _cfg("llama", 80, 8192, 64, 8, 28672, 128256, 8192, name="llama3-70b"),
    "llama3.1-405b": _cfg("llama", 126, 16384, 128, 8, 53248, 128256, 131072, name="llama3.1-405b"),
    "qwen2-7b": _cfg("qwen2", 28, 3584, 28, 4, 18944, 152064, 32768, bias=True, name="qwen2-7b"),
    "qwen2-72b": _cfg("qwen2", 80, 8192, 64, 8, 29568, 152064, 32768, bias=True, name="qwen2-72b"),
}


def preset_profile(name: str, dtype: str = "f16") -> ModelProfile:
    """Profile of a published model by preset name (see PRESETS)."""
    cfg = PRESETS.get(name)
    if cfg is None:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return ModelProfile.from_config(cfg, dtype=dtype, name=name)
