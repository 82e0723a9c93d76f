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

Mixture-of-experts layers (qwen3moe; n_expert > 0): the FFN is n_expert experts of `ffn_size` columns each, of
which each token uses n_expert_used, chosen by a router (n_expert × H, replicated on every shard like the norms).
The FFN unit is then one whole expert (3·F·H weights): tensor-parallel plans split a layer's experts over the
nodes (expert parallelism) instead of its columns. Memory counts every expert (total parameters); the weights
read and FLOPs done per token count the used ones (active parameters): a batch of b tokens touches on average a
fraction 1 − (1 − k/n)^b of the experts (each token picks k of n; uniform routing, the load-balanced case the
router is trained toward, Fedus et al. 2022 "Switch Transformers" §2.2), and does k/n of the FFN's FLOPs.

Bytes follow the weight format (model/formats.py): float32 / bfloat16 / float16 / int4 count every element at the
format's size; `auto` counts each tensor at its real bytes in the file (`TensorBytes`, from the GGUF header), and
memory-bandwidth costs (bytes read per token) follow the same bytes. The KV cache is counted in its cache type
(formats.kv_cache_type: f16 for auto by default, as Ollama).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

from ..model import formats
from ..model.config import ModelConfig, RopeScaling
from ..model.formats import GGUFTensor

# Profile dtype keys besides the weight formats (model/formats.py WEIGHT_FORMATS): the short names of the float
# formats, and any GGUF tensor type in lower case ("q8_0", "q4_k") for a model whose every tensor has that type.
_SHORT_FORMATS = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# Bytes per weight element of the profile dtype keys older callers use (derived from model/formats.py).
DTYPE_BYTES: dict[str, float] = {
    **{k: formats.FORMATS[f].weight_bytes or 0.0 for k, f in _SHORT_FORMATS.items()},
    **{t: formats.bytes_per_element(t) for t in ("q8_0", "q4_1", "q4_0")},
    "int4": formats.FORMATS["int4"].weight_bytes or 0.0,
}


@dataclass(frozen=True)
class TensorBytes:
    """A model's weights in their own (file) types, in the planner's units: what `ModelProfile` counts for the
    `auto` weight format, where every tensor keeps its GGUF type (Q4_K_M files mix Q4_K, Q6_K, Q5_0, Q8_0 …).

    attn_unit: one KV group of one layer — its query heads' q rows, its k and v rows, the matching o columns
      (+ q/k/v biases) — each in its tensor's own type. ffn_unit: one FFN column — a gate row, an up row and a
      down column. layer_norms: attn_norm + ffn_norm (and any other per-layer tensor), replicated on every TP
      shard; of these, shared_expert is a qwen2moe layer's shared expert (`ffn_*_shexp` with its gate), which one
      shard of a stage holds (model/moe.py holds_shared_expert) though every shard reads it. Per-layer types vary
      (llama.cpp gives some layers' attn_v / ffn_down Q6_K), so these three are the averages over the layers: a
      stage of the Q6_K-heavy layers holds slightly more than its share, the model's total is exact. embedding: token_embd. head: the output matrix (token_embd's bytes when tied). final_norm:
      output_norm. (rope_freqs, d/2 floats, is not counted.)
    ffn_block / attn_block: inputs per block of ffn_down's / attn_output's type (the coarsest over the layers):
      the grid a row-parallel cut must fall on for shards to read only their own blocks.
    """

    attn_unit: float
    ffn_unit: float
    layer_norms: float
    embedding: float
    head: float
    final_norm: float
    ffn_block: int = 1
    attn_block: int = 1
    shared_expert: float = 0.0

    def __post_init__(self) -> None:
        for f in ("attn_unit", "ffn_unit", "embedding", "head"):
            if getattr(self, f) <= 0:
                raise ValueError(f"TensorBytes.{f} must be > 0, got {getattr(self, f)}")
        if (self.layer_norms < 0 or self.final_norm < 0 or self.ffn_block < 1 or self.attn_block < 1
                or not 0 <= self.shared_expert <= self.layer_norms):
            raise ValueError(f"TensorBytes: norms must be >= 0 and blocks >= 1, got {self}")

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: Mapping[str, GGUFTensor]) -> "TensorBytes":
        """The table of a GGUF file from its header's tensors (model/formats.py read_gguf_tensors), llama.cpp's
        tensor names; ValueError naming a missing tensor."""
        def get(name: str) -> GGUFTensor:
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"GGUF file lacks tensor {name!r}")
            return t

        L, A, F = cfg.n_layers, cfg.n_kv_heads, cfg.ffn_size
        attn = ffn = norms = 0
        ffn_blocks, attn_blocks = [], []
        attn_names = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")
        ffn_names = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
        if cfg.arch == "phi3":  # fused q|k|v and gate|up tensors (model/weights.py)
            attn_names, ffn_names = ("attn_qkv.weight", "attn_output.weight"), ("ffn_up.weight", "ffn_down.weight")
        if cfg.n_expert:  # the experts' stacked tensors; the unit is one expert (the router counts as a norm)
            ffn_names = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
            F = cfg.n_expert
        biases = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
        for i in range(L):
            attn += sum(get(f"blk.{i}.{n}").nbytes for n in attn_names)
            attn += sum(tensors[f"blk.{i}.{n}"].nbytes for n in biases if f"blk.{i}.{n}" in tensors)
            ffn += sum(get(f"blk.{i}.{n}").nbytes for n in ffn_names)
            ffn_blocks.append(get(f"blk.{i}.{ffn_names[-1]}").block)
            attn_blocks.append(get(f"blk.{i}.attn_output.weight").block)
        counted = {f"blk.{i}.{n}" for i in range(L) for n in attn_names + biases + ffn_names}
        norms = sum(t.nbytes for name, t in tensors.items() if name.startswith("blk.") and name not in counted)
        shared = sum(t.nbytes for name, t in tensors.items() if name.startswith("blk.") and "_shexp." in name)
        embedding = get("token_embd.weight").nbytes
        head = embedding if cfg.tie_embeddings else get("output.weight").nbytes
        return cls(attn / (L * A), ffn / (L * F), norms / L, embedding, head, get("output_norm.weight").nbytes,
                   formats.lcm_blocks(ffn_blocks), formats.lcm_blocks(attn_blocks), shared / L)

    @classmethod
    def uniform(cls, cfg: ModelConfig, bytes_per_weight: float, ffn_block: int = 1,
                attn_block: int = 1) -> "TensorBytes":
        """Every weight at `bytes_per_weight` (a model known by its hyper-parameters, or one stored in one type)."""
        g, d, h = cfg.group_size, cfg.head_dim, cfg.hidden_size
        attn = (2 * g + 2) * d * h + ((g + 2) * d if cfg.attention_bias else 0)
        b = bytes_per_weight
        # an MoE unit is one expert (ffn_size columns); its router (n_expert rows) is replicated like the norms
        ffn_unit = 3 * h * (cfg.ffn_size if cfg.n_expert else 1)
        shared = (3 * cfg.shared_expert_ffn + 1) * h if cfg.shared_expert_ffn else 0
        norms = 2 * h + cfg.n_expert * h + shared
        return cls(attn * b, ffn_unit * b, norms * b, cfg.vocab_size * h * b, cfg.vocab_size * h * b, h * b,
                   ffn_block, attn_block, shared * b)

    @classmethod
    def q4_k_m(cls, cfg: ModelConfig) -> "TensorBytes":
        """A preset counted as Ollama's default download, Q4_K_M, at llama.cpp's average bits per weight
        (model/formats.py Q4_K_M_BITS_PER_WEIGHT); its blocks are the K-quants' 256 where a row is a whole number
        of them, else llama.cpp's 32-input fallback."""
        return cls.uniform(cfg, formats.Q4_K_M_BITS_PER_WEIGHT / 8, formats.q4_k_m_block(cfg.ffn_size),
                           formats.q4_k_m_block(cfg.n_heads * cfg.head_dim))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ModelProfile:
    """Sizes of one model in one weight format.

    name: label used in plans. n_layers .. vocab_size: as ModelConfig. tie_embeddings: output head is the
    embedding matrix. attention_bias: q/k/v carry biases (qwen2). weight_bytes: bytes per weight element (with
    tensor_bytes: derived, the model's average, for display). kv_bytes: bytes per KV-cache element. act_bytes:
    bytes per activation element sent between stages / all-reduced. context_length: trained context (workloads
    longer than it are rejected). embed_bytes: bytes per element of the embedding and output-head matrices where
    they differ from weight_bytes (0 = the same).
    tensor_bytes: the weights' real bytes per unit (TensorBytes: the file's own types); None = every element at
      weight_bytes / embed_bytes.
    n_expert / n_expert_used: experts per MoE layer and experts each token uses (0 = dense FFN); with experts,
      ffn_size is one expert's width and the FFN unit of a split is a whole expert (module docstring).
    shared_expert_ffn: width of a shared expert every token runs (qwen2moe); one shard of a stage holds it (the
      one whose experts start at 0, model/moe.py holds_shared_expert), so a plan counts it there only
      (shared_expert_bytes; CostModel.shard_memory).
    sliding_window / sliding_layers: how many of the layers attend over (and cache) only the last sliding_window
      positions (gemma3: 5 of 6; model/kv_cache.py keeps those as rings); see kv_context.
    ffn_block / attn_block: inputs per quantisation block of ffn_down / attn_output (1 = any column); with
      tensor_bytes, the table's. Tensor-parallel splits keep FFN columns in multiples of `ffn_step` and KV groups
      in multiples of `kv_step`, so each shard's row-parallel slice is whole blocks.
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
    tensor_bytes: TensorBytes | None = None
    ffn_block: int = 1
    attn_block: int = 1
    n_expert: int = 0
    n_expert_used: int = 0
    shared_expert_ffn: int = 0
    sliding_window: int = 0
    sliding_layers: int = 0

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
        if self.n_expert < 0 or (self.n_expert and not 0 < self.n_expert_used <= self.n_expert):
            raise ValueError(f"need 0 < n_expert_used ({self.n_expert_used}) <= n_expert ({self.n_expert})")
        if self.ffn_block < 1 or self.ffn_size % self.ffn_block:
            raise ValueError(f"ffn_size ({self.ffn_size}) must be a multiple of ffn_block ({self.ffn_block})")
        # attn_output has n_heads·d inputs, a whole number of its blocks; so n_kv_heads is a multiple of kv_step
        if self.attn_block < 1 or self.n_kv_heads % self.kv_step:
            raise ValueError(f"attn_output's {self.n_heads * self.head_dim} inputs are not a whole number of "
                             f"{self.attn_block}-input blocks")
        if self.tensor_bytes is not None:  # derived: the average over the model, for display
            object.__setattr__(self, "weight_bytes", self.total_weight_bytes / self.total_params)

    # --- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig, dtype: str = "f16", name: str | None = None,
                    kv_cache_type: str | None = None, tensor_bytes: TensorBytes | None = None) -> "ModelProfile":
        """Profile of `cfg` in weight format `dtype`: a model/formats.py WEIGHT_FORMATS name, a short float name
        (f32 / f16 / bf16), or a GGUF type in lower case ("q8_0") for a model whose every tensor has that type.

        "auto" (each tensor in its file's type) needs `tensor_bytes`: TensorBytes.from_tensors of the file's
        header, or TensorBytes.q4_k_m for a model known only by its hyper-parameters. kv_cache_type: the KV cache
        setting (f32 | f16 | q8_0, from --kv-cache-type / OLLAMA_KV_CACHE_TYPE); None = the format's default
        (formats.kv_cache_type)."""
        fmt_name = _SHORT_FORMATS.get(dtype, dtype)
        if fmt_name in formats.FORMATS:
            fmt = formats.FORMATS[fmt_name]
            if fmt.weight_bytes is None and tensor_bytes is None:
                raise ValueError(f"dtype {dtype!r} counts each tensor in its file's type: pass tensor_bytes "
                                 f"(TensorBytes.from_tensors of the file's header, or TensorBytes.q4_k_m)")
            if fmt.weight_bytes is not None and tensor_bytes is not None:
                raise ValueError(f"dtype {dtype!r} holds every weight in {fmt.compute_dtype}: tensor_bytes (the "
                                 f"file's own types) applies to 'auto' only")
            kv = formats.kv_cache_type(fmt_name, kv_cache_type)
            wb, embed, act, block = fmt.weight_bytes or 1.0, fmt.matrix_bytes or 0.0, fmt.stream_bytes, fmt.block or 1
        else:
            try:
                type_bytes, type_block = formats.bytes_per_element(dtype), formats.block_size(dtype)
            except ValueError:
                raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(formats.WEIGHT_FORMATS)}, "
                                 f"{', '.join(_SHORT_FORMATS)} or a GGUF tensor type (q8_0, q4_k, ...)") from None
            # one GGUF type throughout: held as `auto` holds a file's types (stream, default cache)
            tensor_bytes = tensor_bytes or TensorBytes.uniform(cfg, type_bytes, type_block, type_block)
            kv = formats.kv_cache_type("auto", kv_cache_type)
            wb, embed, act, block = 1.0, 0.0, formats.FORMATS["auto"].stream_bytes, 1
        return cls(
            name=name or cfg.name or f"{cfg.arch}-{cfg.n_layers}l",
            n_layers=cfg.n_layers, hidden_size=cfg.hidden_size, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, ffn_size=cfg.ffn_size, vocab_size=cfg.vocab_size,
            context_length=cfg.context_length, tie_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.attention_bias, weight_bytes=wb, kv_bytes=formats.kv_bytes_per_element(kv),
            act_bytes=act, embed_bytes=embed, tensor_bytes=tensor_bytes,
            ffn_block=tensor_bytes.ffn_block if tensor_bytes else block,  # a table carries its file's blocks
            attn_block=tensor_bytes.attn_block if tensor_bytes else block,
            n_expert=cfg.n_expert, n_expert_used=cfg.n_expert_used, shared_expert_ffn=cfg.shared_expert_ffn,
            sliding_window=cfg.sliding_window, sliding_layers=sum(cfg.is_sliding(i) for i in range(cfg.n_layers)),
        )

    # --- granularity --------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def ffn_step(self) -> int:
        """FFN units per tensor-parallel unit: ffn_down is cut by input columns, on its type's block grid (an MoE
        layer is split by whole experts, which cuts no expert's columns)."""
        return 1 if self.n_expert else self.ffn_block

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def ffn_units(self) -> int:
        """Units of the FFN axis a tensor-parallel split divides: FFN columns, or whole experts of an MoE layer."""
        return self.n_expert or self.ffn_size

    @property
    def active_ffn_units(self) -> int:
        """FFN units one token computes with: every column, or its n_expert_used experts."""
        return self.n_expert_used or self.ffn_size

    def ffn_read_fraction(self, tokens: float) -> float:
        """Fraction of the FFN units whose weights a step of `tokens` tokens reads: 1 for a dense FFN; for experts,
        the expected share some token routes to, 1 − (1 − k/n)^tokens (module docstring)."""
        if not self.n_expert:
            return 1.0
        return 1.0 - (1.0 - self.n_expert_used / self.n_expert) ** max(tokens, 1.0)

    @property
    def ffn_compute_fraction(self) -> float:
        """Fraction of the FFN units' FLOPs a token does: k/n for experts, 1 for a dense FFN."""
        return self.n_expert_used / self.n_expert if self.n_expert else 1.0

    @property
    def kv_step(self) -> int:
        """KV groups per tensor-parallel unit: a group owns g·d of attn_output's input columns, so cuts after every
        kv_step groups fall on its block grid (Q4_K o-projection of llama-7b, g·d = 128: 2 groups)."""
        gd = self.group_size * self.head_dim
        return self.attn_block // math.gcd(self.attn_block, gd)

    # --- parameters (elements) ----------------------------------------------------------------------
    @property
    def attn_unit_params(self) -> int:
        """Weights of one KV group in one layer: (2g + 2)·d·H (+ (g + 2)·d biases)."""
        g, d, h = self.group_size, self.head_dim, self.hidden_size
        return (2 * g + 2) * d * h + ((g + 2) * d if self.attention_bias else 0)

    @property
    def ffn_unit_params(self) -> int:
        """Weights of one FFN unit in one layer: a column (gate row + up row + down column), or a whole expert."""
        return 3 * self.hidden_size * (self.ffn_size if self.n_expert else 1)

    @property
    def layer_norm_params(self) -> int:
        """attn_norm + ffn_norm (+ an MoE layer's router and shared expert): a layer's weights outside its attention
        and FFN units, which every tensor-parallel shard reads whole from the file. Every shard holds them but the
        shared expert, which one shard of a stage holds (shared_expert_params)."""
        return 2 * self.hidden_size + self.n_expert * self.hidden_size + self.shared_expert_params

    @property
    def shared_expert_params(self) -> int:
        """A layer's shared expert: gate, up and down (3·S·H) and its sigmoid gate vector (H); 0 without one."""
        return (3 * self.shared_expert_ffn + 1) * self.hidden_size * (self.shared_expert_ffn > 0)

    @property
    def layer_params(self) -> int:
        return self.n_kv_heads * self.attn_unit_params + self.ffn_units * self.ffn_unit_params + self.layer_norm_params

    @property
    def active_params(self) -> int:
        """Weights one token computes with (an MoE model's "active parameters"; total_params for a dense one)."""
        dense_layer = self.n_kv_heads * self.attn_unit_params + self.layer_norm_params
        head = self.hidden_size if self.tie_embeddings else self.head_params
        return (self.n_layers * (dense_layer + self.active_ffn_units * self.ffn_unit_params)
                + self.embedding_params + head)

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
        t = self.tensor_bytes
        return t.attn_unit if t else self.attn_unit_params * self.weight_bytes

    @property
    def ffn_unit_bytes(self) -> float:
        t = self.tensor_bytes
        return t.ffn_unit if t else self.ffn_unit_params * self.weight_bytes

    @property
    def layer_norm_bytes(self) -> float:
        t = self.tensor_bytes
        return t.layer_norms if t else self.layer_norm_params * self.weight_bytes

    @property
    def shared_expert_bytes(self) -> float:
        """The part of layer_norm_bytes that is the shared expert (held by one shard of a stage)."""
        t = self.tensor_bytes
        return t.shared_expert if t else self.shared_expert_params * self.weight_bytes

    @property
    def layer_bytes(self) -> float:
        """All weights of one layer."""
        if self.tensor_bytes is None:
            return self.layer_params * self.weight_bytes
        return self.n_kv_heads * self.attn_unit_bytes + self.ffn_units * self.ffn_unit_bytes + self.layer_norm_bytes

    @property
    def _matrix_bytes(self) -> float:
        """Bytes per element of the embedding / output-head matrices (without tensor_bytes)."""
        return self.embed_bytes or self.weight_bytes

    @property
    def _final_norm_bytes(self) -> float:
        t = self.tensor_bytes
        return t.final_norm if t else self.hidden_size * self.weight_bytes

    @property
    def embedding_bytes(self) -> float:
        t = self.tensor_bytes
        return t.embedding if t else self.embedding_params * self._matrix_bytes

    @property
    def head_bytes(self) -> float:
        """Output head + final norm as stored on a node that does NOT also hold the embedding."""
        t = self.tensor_bytes
        matrix = t.head if t else self.vocab_size * self.hidden_size * self._matrix_bytes
        return matrix + self._final_norm_bytes

    def head_extra_bytes(self, holds_embedding: bool) -> float:
        """Bytes the output role adds to a node: a tied head on the node that already holds the embedding
        costs only the final norm (the matrix is shared); otherwise its own copy."""
        if self.tie_embeddings and holds_embedding:
            return self._final_norm_bytes
        return self.head_bytes

    @property
    def kv_unit_bytes_per_token(self) -> float:
        """KV cache of one KV head in one layer for one token: K and V rows, 2·d elements."""
        return 2 * self.head_dim * self.kv_bytes

    def kv_context(self, context: float) -> float:
        """Cached positions per layer for sequences of `context` tokens, averaged over the layers: a sliding layer
        holds (and reads) min(context, window). Layers are the planner's interchangeable unit, so a stage is
        charged the average; with gemma3's 5-sliding-1-global pattern a stage of a multiple of 6 layers is exact
        and any other is off by under one global layer's cache."""
        if not self.sliding_window or not self.sliding_layers:
            return context
        local = min(context, self.sliding_window)
        return (self.sliding_layers * local + (self.n_layers - self.sliding_layers) * context) / self.n_layers

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
        """One token through one layer (an MoE layer: its used experts only)."""
        return (self.n_kv_heads * self.attn_unit_flops(context)
                + self.ffn_units * self.ffn_compute_fraction * self.ffn_unit_flops)

    @property
    def head_flops(self) -> float:
        """Logits of one token."""
        return 2.0 * self.vocab_size * self.hidden_size

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {f: getattr(self, f) for f in self.__dataclass_fields__}
        if self.tensor_bytes is not None:
            d["tensor_bytes"] = self.tensor_bytes.to_dict()
        return d


def _cfg(arch: str, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int, ctx: int,
         tied: bool = False, bias: bool = False, name: str = "") -> ModelConfig:
    return ModelConfig(arch=arch, n_layers=layers, hidden_size=hidden, n_heads=heads, n_kv_heads=kv,
                       ffn_size=ffn, vocab_size=vocab, context_length=ctx, tie_embeddings=tied,
                       attention_bias=bias, name=name)


def _moe_cfg(layers: int, hidden: int, heads: int, kv: int, head_dim: int, experts: int, used: int, expert_ffn: int,
             vocab: int, ctx: int, name: str) -> ModelConfig:
    """A Qwen3-MoE config (qk norms, untied head, every layer's FFN a mixture of experts of width `expert_ffn`)."""
    return ModelConfig(arch="qwen3moe", n_layers=layers, hidden_size=hidden, n_heads=heads, n_kv_heads=kv,
                       head_dim=head_dim, ffn_size=expert_ffn, vocab_size=vocab, context_length=ctx,
                       rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True, n_expert=experts, n_expert_used=used,
                       name=name)


def _gemma3_cfg(layers: int, hidden: int, heads: int, kv: int, head_dim: int, ffn: int, ctx: int, window: int,
                query_scalar: int, rope_factor: float, name: str) -> ModelConfig:
    """A Gemma 3 text config: tied head, q/k and post norms, GeGLU, 5 sliding layers of every 6 (local RoPE base 1e4;
    the global base 1e6 with linear scaling rope_factor), softmax scale query_scalar ** -0.5."""
    return ModelConfig(arch="gemma3", n_layers=layers, hidden_size=hidden, n_heads=heads, n_kv_heads=kv,
                       head_dim=head_dim, ffn_size=ffn, vocab_size=262208, context_length=ctx, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_embeddings=True, qk_norm=True, post_norms=True, activation="gelu_tanh",
                       embed_scale=hidden ** 0.5, attention_scale=query_scalar ** -0.5, sliding_window=window,
                       sliding_window_pattern=6, rope_local_theta=1e4,
                       rope_scaling=RopeScaling("linear", rope_factor) if rope_factor != 1.0 else RopeScaling(),
                       name=name)


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
    "gemma3-27b": _gemma3_cfg(62, 5376, 32, 16, 128, 21504, 131072, 1024, 168, 8.0, name="gemma3-27b"),
    "qwen3-32b": ModelConfig(arch="qwen3", n_layers=64, hidden_size=5120, n_heads=64, n_kv_heads=8, head_dim=128,
                             ffn_size=25600, vocab_size=151936, context_length=40960, rope_theta=1e6,
                             rms_norm_eps=1e-6, qk_norm=True, name="qwen3-32b"),
    "qwen3-30b-a3b": _moe_cfg(48, 2048, 32, 4, 128, 128, 8, 768, 151936, 40960, name="qwen3-30b-a3b"),
    "qwen3-235b-a22b": _moe_cfg(94, 4096, 64, 4, 128, 128, 8, 1536, 151936, 40960, name="qwen3-235b-a22b"),
}


def preset_profile(name: str, dtype: str = "f16", kv_cache_type: str | None = None) -> ModelProfile:
    """Profile of a published model by preset name (see PRESETS) in weight format `dtype`; "auto" has no file to
    read, so it counts the model as Q4_K_M, Ollama's default download (TensorBytes.q4_k_m)."""
    cfg = PRESETS.get(name)
    if cfg is None:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    table = TensorBytes.q4_k_m(cfg) if dtype == "auto" else None
    return ModelProfile.from_config(cfg, dtype=dtype, name=name, kv_cache_type=kv_cache_type, tensor_bytes=table)
