"""What one process holds of a model: a layer range and a tensor-parallel slice of each layer.

Ranges are half-open `[start, end)`. Tensor-parallel slices follow Megatron/vLLM:
  - column-parallel (split output rows): q, k, v by heads; gate, up by FFN columns.
  - row-parallel (split input columns): o by heads, down by FFN columns; each shard's output is a
    partial sum, and the shards of one stage sum (all-reduce) them: Y = X A, A = [A_1; …; A_p] by rows,
    X = [X_1 … X_p] by columns, Y = Σ X_i A_i.
Query heads travel with their KV head (GQA group), so `heads` is always `kv_heads` × group size;
uneven splits (9 heads in 3 groups over 2 shards = 2 groups + 1 group) need no special case.
Expert parallelism (mixture-of-experts models, model/moe.py): `experts` names the experts of every MoE layer this
shard holds (vLLM's --enable-expert-parallel runs EP inside the TP group the same way). Every shard routes every
token, runs its own experts on the tokens routed to them, and its partial output joins the all-reduce the
row-parallel down projection already does; an expert absent from all shards but one contributes exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


def _check_range(name: str, r: tuple[int, int], limit: int, allow_empty: bool = False) -> None:
    s, e = r
    if not (0 <= s <= e <= limit) or (not allow_empty and s == e):
        raise ValueError(f"{name} range [{s}, {e}) is not a valid sub-range of [0, {limit})")


@dataclass(frozen=True)
class ShardSpec:
    """One shard: layers [layers[0], layers[1]) and, within each, its slice of heads and FFN columns.

    has_embedding: holds the token embedding (first pipeline stage; replicated across its TP shards).
    has_output: holds final norm + output head and produces logits (last stage; TP rank 0 of it only,
      other TP shards of the last stage return hidden states that the caller ignores).
    experts: the experts [start, end) of each MoE layer this shard holds (None: all of them; may be empty, a rank
      that holds only attention); ignored by dense models.
    """

    layers: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    has_embedding: bool
    has_output: bool
    experts: tuple[int, int] | None = None

    @classmethod
    def full(cls, cfg: ModelConfig) -> "ShardSpec":
        """The whole model in one shard."""
        return cls((0, cfg.n_layers), (0, cfg.n_kv_heads), (0, cfg.ffn_size), True, True)

    def heads(self, cfg: ModelConfig) -> tuple[int, int]:
        """Query-head range implied by the KV-head range (GQA groups stay together)."""
        g = cfg.group_size
        return (self.kv_heads[0] * g, self.kv_heads[1] * g)

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ValueError if this shard does not fit the model."""
        _check_range("layers", self.layers, cfg.n_layers, allow_empty=True)
        _check_range("kv_heads", self.kv_heads, cfg.n_kv_heads)
        _check_range("ffn", self.ffn, cfg.ffn_size)
        if self.experts is not None:
            if not cfg.n_expert:
                raise ValueError(f"shard names experts {self.experts} but the model has no experts")
            _check_range("experts", self.experts, cfg.n_expert, allow_empty=True)

    def expert_range(self, cfg: ModelConfig) -> tuple[int, int]:
        """The experts this shard holds ((0, 0) for a dense model)."""
        return self.experts if self.experts is not None else (0, cfg.n_expert)

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    def is_full_width(self, cfg: ModelConfig) -> bool:
        """True when this shard holds every head and FFN column (no tensor parallelism)."""
        return (self.kv_heads == (0, cfg.n_kv_heads) and self.ffn == (0, cfg.ffn_size)
                and self.expert_range(cfg) == (0, cfg.n_expert))
