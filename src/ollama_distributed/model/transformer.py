"""Shard-aware Llama-family transformer (llama, Mistral-style, qwen2) for ragged batches with a KV cache.

A `ModelShard` holds layers [start, end) of the model and, within each layer, a contiguous range of KV-head
groups and FFN columns (ShardSpec). Tensor parallelism follows Megatron-LM (Shoeybi et al., 2019):
  - q/k/v and gate/up are column-parallel: Y_i = X A_i with A = [A_1 … A_p] split by output rows (heads, FFN).
  - o and down are row-parallel: Y = Σ_i X_i B_i; each shard returns its partial sum and `all_reduce` adds them
    *before* the residual add, so every shard of a stage continues from the same residual stream.
Pipeline stages chain by passing the residual stream (hidden states) forward.

Math per block (Llama, Touvron et al. 2023): h += o(attn(rope(q(n1(h))), rope(k(n1(h))), v(n1(h))));
h += down(silu(gate(n2(h))) * up(n2(h))) with RMSNorm n1, n2 (Zhang & Sennrich 2019), GQA (Ainslie et al. 2023).
Numerics follow transformers' LlamaForCausalLM (RMSNorm in float32, RoPE tables computed in float32).

Other dense families are the same block with config switches (model/config.py), as in transformers' modeling files:
qwen3 normalises q and k per head before RoPE; phi3 is llama's math on fused tensors (split by the loader); gemma3
also scales the embedding by sqrt(hidden), wraps attention and FFN outputs in RMSNorms before each residual add,
uses GELU-tanh, and lets 5 of every 6 layers attend over a sliding window with their own RoPE base (their cache is a
ring of the window: model/kv_cache.py); gemma2 is gemma3 without q/k norms, every other layer sliding, one RoPE base,
and attention scores and logits soft-capped (cap · tanh(x / cap), so its attention takes torch's ops). GGUF stores gemma's (1 + w) norm weights with the 1 added
(convert_hf_to_gguf.py; transformers' GGUF loader subtracts it), so every RMSNorm here is x·w.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import cpu_kernels, fused_decode, rope
from .config import ModelConfig, RopeScaling
from .kv_cache import KVCache
from .file_format import GGUFRows, lookup, pack_stacked
from .linear import linear, weight_tensors
from .moe import MoEFFN
from .formats import weight_format_name
from .quant import GROUP, QUANT_FORMATS, RefinedHead, QuantMatrix, Weight, kv_cache_dtype, pack, quantize_rtn
from .shard import ShardSpec
from .weights import drop_file_pages, load_weights, read_config

AllReduce = Callable[[torch.Tensor], torch.Tensor]
OUTPUTS = ("logits", "all_logits", "hidden")
_LAYER_KEYS = ("attn_norm", "ffn_norm", "q", "k", "v", "o", "gate", "up", "down")
_DENSE_FFN_KEYS = ("gate", "up", "down")  # a mixture-of-experts layer has its experts instead (model/moe.py)
_BIAS_KEYS = ("q_bias", "k_bias", "v_bias")
_QK_NORM_KEYS = ("q_norm", "k_norm")
_POST_NORM_KEYS = ("post_attn_norm", "post_ffn_norm")


@dataclass
class _Layer:
    """One block's local weights in torch (out, in) layout; q/k/v and gate/up are fused so each costs one GEMM
    (fewer ops per token). (A transposed (in, out) layout measured no faster in a full decode step: decode is
    bound by streaming the weights from memory, not by the GEMM kernel.)"""

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    wqkv: Weight  # (q_dim + 2 * kv_dim, hidden)
    bqkv: torch.Tensor | None
    wo: Weight  # (hidden, q_dim)
    wgu: Weight | None  # (2 * ffn_local, hidden); None in a mixture-of-experts layer
    wdown: Weight | None  # (hidden, ffn_local)
    moe: MoEFFN | None = None  # router + this shard's experts, instead of wgu/wdown
    q_norm: torch.Tensor | None = None  # (head_dim,) per-head RMSNorm of q and k before RoPE (qwen3, gemma3)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # (hidden,) RMSNorm of the attention / FFN output (gemma3)
    post_ffn_norm: torch.Tensor | None = None
    sliding: bool = False  # attends over the last cfg.sliding_window positions only, with the local RoPE base


@dataclass
class _Seq:
    """Where one sequence's new tokens sit in the packed batch and in the cache (fixed for a whole forward)."""

    offset: int  # first row in the packed batch
    count: int  # new tokens
    slot: int  # cache slot
    total: int  # cached + new tokens after this step
    mask: torch.Tensor | None  # (count, total) bool, only for a multi-token chunk after earlier tokens
    # (slot,) and (total,) int64, for cpu_kernels' attend_cached on a one-token sequence attended on its own
    where: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _DecodeBatch:
    """The one-token (decode) sequences of a step, attended together in one SDPA call per layer.

    The cache is slot-major, so the slots [lo, hi) the batch touches are one strided view of each layer's cache
    (no gather): queries are scattered into that slot range (`rows`: slot - lo per sequence), every slot row
    attends over [0, t_max) under a key-padding mask (position < that sequence's length), and the rows of the
    batch are read back. Slots in [lo, hi) that are not in the batch see only position 0 (a finite, discarded
    row instead of an all-masked NaN). Masked keys get exactly zero weight, so each row equals the per-sequence
    SDPA result up to float summation order (tests/model/test_speed_paths.py).
    """

    packed: torch.Tensor | None  # (B,) rows of these sequences in the packed batch; None = all rows, in order
    rows: torch.Tensor | None  # (B,) slot - lo per sequence; None when the slots are exactly lo, lo+1, … in order
    lo: int
    hi: int
    t_max: int
    mask: torch.Tensor  # (hi - lo, 1, 1, t_max) bool key-padding mask
    slots: torch.Tensor  # (B,) int64 cache slot per sequence (for cpu_kernels' attend_cached)
    lengths: torch.Tensor  # (B,) int64 cached positions per sequence, the new token included
    window_mask: torch.Tensor | None = None  # `mask` restricted to each row's last sliding_window positions

    @classmethod
    def build(cls, seqs: list["_Seq"], n_tok: int, window: int = 0) -> "_DecodeBatch | None":
        dec = [s for s in seqs if s.count == 1]
        if len(dec) < 2:
            return None
        slots = [s.slot for s in dec]
        lo, hi = min(slots), max(slots) + 1
        if hi - lo > 2 * len(dec):
            # A sparse slot range would waste more attention work than it saves; gathering is not worth a
            # third path for a state the engine rarely reaches (slots are recycled lowest-first).
            return None
        t_max = max(s.total for s in dec)
        lengths = torch.ones(hi - lo, dtype=torch.int64)
        lengths[torch.tensor(slots) - lo] = torch.tensor([s.total for s in dec])
        mask = (torch.arange(t_max)[None, :] < lengths[:, None])[:, None, None, :]
        in_order = slots == list(range(lo, hi))
        packed = None if len(dec) == n_tok else torch.tensor([s.offset for s in dec])
        slot_t, length_t = torch.tensor(slots), torch.tensor([s.total for s in dec])
        window_mask = None
        if window:  # keys (p - window, p] of a query at p = length - 1 (transformers' sliding_window_overlay)
            window_mask = mask & (torch.arange(t_max)[None, :] >= lengths[:, None] - window)[:, None, None, :]
        return cls(packed, None if in_order else slot_t - lo, lo, hi, t_max, mask, slot_t, length_t, window_mask)


class ModelShard:
    """Layers `spec.layers` of `cfg`, for the heads and FFN columns `spec` names. See module docstring."""

    def __init__(self, cfg: ModelConfig, spec: ShardSpec, weights: dict[str, Any], quant: str | None = None,
                 kv_dtype: torch.dtype | str | None = None) -> None:
        """Build from canonical weights (contracts.md).

        `weights` is consumed: each layer's entries are popped as they are fused/transposed into this shard's
        layout, so building needs about one layer of extra memory instead of a second copy of the shard.
        quant="int4" (implied when `weights` holds QuantMatrix entries): layer matrices run as 4-bit groups and
        the output head ranks with 4-bit rows (model/quant.py); dense matrices are quantised here. The residual
        stream, norms, attention and KV cache are float32 (`dtype`): our 4-bit kernel takes float32 inputs, and with
        torch's (bf16 inputs and outputs) a float32 stream still halves the free-running disagreement with fp32
        (73 → 84 % equal tokens on 20 prompts × 32 tokens, for 5 % of the step; bench/README.md section 6).
        quant="native" (implied by GGUFRows entries; `--dtype auto`): every matrix stays in its file type
        (model/file_format.py), the stream is float32, and the embedding rows are decoded on lookup.
        kv_dtype: the KV cache's dtype (default: the format's, model/formats.py kv_cache_type: float16 for
        quant="native", float32 for int4, else the stream's).
        """
        spec.validate(cfg)
        if quant is None and any(isinstance(w, QuantMatrix) for w in weights.values()):
            quant = "int4"
        if quant is None and any(isinstance(w, GGUFRows) for w in weights.values()):
            quant = "native"
        if quant is not None and quant not in QUANT_FORMATS:
            raise ValueError(f"unknown weight quantisation {quant!r}: expected one of {QUANT_FORMATS}")
        self.quant = quant
        self.cfg, self.spec = cfg, spec
        h0, h1 = spec.heads(cfg)
        self.n_heads = h1 - h0
        self.n_kv = spec.kv_heads[1] - spec.kv_heads[0]
        self.ffn_local = spec.ffn[1] - spec.ffn[0]
        self.q_dim = self.n_heads * cfg.head_dim
        self.kv_dim = self.n_kv * cfg.head_dim
        self.embed = weights["embed"] if spec.has_embedding else None
        if quant == "int4" and self.embed is not None:
            self.embed = self.embed.to(torch.float16)  # a lookup table: half the bytes, rows cast on lookup
        self.norm = weights["norm"] if spec.has_output else None
        self.lm_head: Weight | None = None
        if quant == "native":
            self.embed = self._fused([self.embed]) if self.embed is not None else None
            if spec.has_output:  # a tied head is the embedding's own blocks
                tied = cfg.tie_embeddings and self.embed is not None
                self.lm_head = self.embed if tied else self._fused([weights["lm_head"]])
        elif spec.has_output:
            self.lm_head = RefinedHead(weights["lm_head"]) if quant else weights["lm_head"]
            if quant and cfg.tie_embeddings and self.embed is not None:
                self.embed = self.lm_head.table  # one float16 table for both ends (rows are cast on lookup)
        self.layers: list[_Layer] = []
        extra_keys = (_BIAS_KEYS if cfg.attention_bias else ()) + (_QK_NORM_KEYS if cfg.qk_norm else ()) + (
            _POST_NORM_KEYS if cfg.post_norms else ())
        for i in range(*spec.layers):
            n = f"layers.{i}."
            w = {k: weights.pop(n + k) for k in _LAYER_KEYS + extra_keys
                 if not (cfg.is_moe and k in _DENSE_FFN_KEYS)}
            bias = torch.cat([w["q_bias"], w["k_bias"], w["v_bias"]]) if cfg.attention_bias else None
            self.layers.append(
                _Layer(
                    attn_norm=w["attn_norm"],
                    ffn_norm=w["ffn_norm"],
                    wqkv=self._fused([w["q"], w["k"], w["v"]]),
                    bqkv=bias,
                    wo=self._fused([w["o"]]),
                    wgu=None if cfg.is_moe else self._fused([w["gate"], w["up"]]),
                    wdown=None if cfg.is_moe else self._fused([w["down"]]),
                    moe=MoEFFN.build(weights, n, spec.expert_range(cfg), cfg.n_expert_used, cfg.norm_topk_prob,
                                     self.ffn_local, self._fused) if cfg.is_moe else None,
                    q_norm=w.get("q_norm"),
                    k_norm=w.get("k_norm"),
                    post_attn_norm=w.get("post_attn_norm"),
                    post_ffn_norm=w.get("post_ffn_norm"),
                    sliding=cfg.is_sliding(i),
                )
            )
        if not self.layers and self.embed is None and self.lm_head is None:
            raise ValueError(f"shard {spec} holds no layers, embedding or output head")
        # dtype of the residual stream (the hidden states a pipeline stage takes and returns), attention and cache
        if quant:
            self.dtype = torch.float32
        else:
            some = self.layers[0].wqkv if self.layers else (self.embed if self.embed is not None else self.lm_head)
            assert isinstance(some, torch.Tensor)
            self.dtype = some.dtype
        # (the format's default: float16 for the file's own types, as Ollama's; model/formats.py kv_cache_type)
        self.kv_dtype = kv_dtype or kv_cache_dtype(weight_format_name(str(self.dtype), quant))
        self.inv_freq = rope.inv_freq(cfg, weights.get("rope_freqs"))
        # Phi-3 LongRoPE: the long factors' table too, chosen per cache by its capacity (rope.uses_long_factors)
        self.inv_freq_long = rope.inv_freq(cfg, long=True) if cfg.rope_scaling.kind == "longrope" else None
        # Sliding-window layers rotate with their own base and no scaling (gemma3: 10000 vs the global 1e6).
        self.inv_freq_local = rope.inv_freq(replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=RopeScaling()))
        self._has_sliding = any(layer.sliding for layer in self.layers)
        # Queries are pre-multiplied by this so every attention path (SDPA's default scale, the fused kernels)
        # computes softmax(q·k * cfg.attention_scale); 1.0 for every model whose scale is head_dim ** -0.5.
        self._q_factor = cfg.attention_scale * cfg.head_dim ** 0.5
        if abs(self._q_factor - 1.0) < 1e-9:  # (head_dim ** -0.5 * head_dim ** 0.5 is 1 only up to rounding)
            self._q_factor = 1.0
        # Our fused RMSNorm, RoPE + cache writes and decode attention (model/cpu_kernels.py) for float32 shards on
        # CPU; torch's ops elsewhere, and for shapes the kernels do not take.
        probe = self.layers[0].attn_norm if self.layers else self.norm
        fits = cfg.hidden_size % 16 == 0 and cfg.head_dim % 32 == 0 and cfg.head_dim <= 256
        on_cpu = probe is None or probe.device.type == "cpu"
        self._ops = cpu_kernels.ops() if self.dtype == torch.float32 and on_cpu and fits else None
        # RoPE + cache writes and decode attention: caches of float32 or float16 (a q8_0 one takes torch's path)
        self._cache_ops = self._ops if self.kv_dtype in (torch.float32, torch.float16) else None
        if cfg.attn_softcap:  # gemma2's capped scores: torch's ops (neither SDPA nor our kernels cap)
            self._cache_ops = None
        # One masked attention call for all decode sequences of a step (False: one call per sequence, the
        # reference path the batched one is tested against).
        self.batched_decode = True
        # All layers of a decode step in one kernel call (model/fused_decode.py), built on the first decode step;
        # False: the op-by-op path (the reference the fused one is tested against).
        self.fused_decode = True
        self._decode_plan: Any = None

    def _fused(self, parts: list[Any]) -> Weight:
        """Output-row concatenation of q/k/v or gate/up (one GEMM each: fewer ops per token), packed when quantised."""
        if not self.quant:
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.quant == "native":
            if all(isinstance(p, GGUFRows) for p in parts):
                return pack_stacked(parts)
            # a row-parallel cut off the block grid came back as float32 (model/weights.py _ShardReader.rows)
            dense = [p.dequantize() if isinstance(p, GGUFRows) else p.float() for p in parts]
            return torch.cat(dense) if len(dense) > 1 else dense[0]
        if parts[0].shape[1] % GROUP:  # inputs cut off the group grid (an uneven row-parallel split): stay dense
            dense = [p.dequantize() if isinstance(p, QuantMatrix) else p for p in parts]
            return torch.cat(dense).float()
        qms = [p if isinstance(p, QuantMatrix) else quantize_rtn(p) for p in parts]
        return pack(QuantMatrix.cat(qms) if len(qms) > 1 else qms[0])

    @classmethod
    def from_file(cls, path: str | Path, spec: ShardSpec | None = None, dtype: torch.dtype = torch.float32,
                  quant: str | None = None, kv_dtype: torch.dtype | str | None = None) -> "ModelShard":
        """Read config and only this shard's weights from a GGUF file or HF directory (whole model by default).
        With quant="int4", `dtype` applies to nothing (the shard computes in float32); see __init__."""
        cfg = read_config(path)
        spec = spec or ShardSpec.full(cfg)
        shard = cls(cfg, spec, load_weights(path, cfg, spec, dtype, quant), quant, kv_dtype)
        drop_file_pages(path)
        return shard

    def weight_bytes(self) -> int:
        """Bytes of the distinct weight storages this shard holds (a tied output head counts once; the RoPE table,
        derived from the config, is not a weight)."""
        tensors = [*weight_tensors(self.embed), self.norm, *weight_tensors(self.lm_head)]
        tensors += [t for layer in self.layers for w in vars(layer).values() if not isinstance(w, (bool, int, float))
                    for t in weight_tensors(w)]  # a layer's flags (e.g. sliding) are not weights
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
        return sum(storages.values())

    def new_cache(self, max_seq_len: int) -> KVCache:
        """This shard's KV cache; sliding-window layers keep a ring of their window (model/kv_cache.py)."""
        return KVCache(self.spec.n_layers, self.n_kv, self.cfg.head_dim, max_seq_len, self.kv_dtype,
                       ring_layers=tuple(layer.sliding for layer in self.layers), window=self.cfg.sliding_window)

    # ---------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        seq_ids: list[int],
        token_counts: list[int],
        cache: KVCache,
        all_reduce: AllReduce | None = None,
        output: str = "logits",
    ) -> torch.Tensor:
        """Append each sequence's new tokens to `cache` and run them through this shard (contracts.md).

        x: int64 token ids (N,) when spec.has_embedding, else hidden states (N, hidden); N = sum(token_counts),
        sequences packed back to back in seq_ids order.
        """
        n_tok = self._check_inputs(x, seq_ids, token_counts, output)
        slots, starts = cache.prepare(seq_ids, token_counts)
        seqs, offset = [], 0
        for slot, start, count in zip(slots, starts, token_counts):
            mask = None
            if count > 1 and start > 0:  # causal mask shifted by the cached prefix
                mask = torch.arange(start + count)[None, :] <= torch.arange(start, start + count)[:, None]
            seqs.append(_Seq(offset, count, slot, start + count, mask))
            offset += count
        if len(seqs) == 1:
            pos = torch.arange(starts[0], starts[0] + n_tok)
            slot_idx = torch.full((n_tok,), slots[0], dtype=torch.int64)
        else:
            counts = torch.tensor(token_counts)
            first = torch.cumsum(counts, 0) - counts
            pos = torch.arange(n_tok) - torch.repeat_interleave(first - torch.tensor(starts), counts)
            slot_idx = torch.repeat_interleave(torch.tensor(slots), counts)
        long = self.inv_freq_long is not None and rope.uses_long_factors(self.cfg, cache.max_seq_len)
        cos, sin = rope.cos_sin(self.inv_freq_long if long else self.inv_freq, pos, self.dtype,
                                rope.attention_factor(self.cfg))
        local = rope.cos_sin(self.inv_freq_local, pos, self.dtype) if self._has_sliding else (cos, sin)
        window = self.cfg.sliding_window if self._has_sliding else 0
        plan = self._fused_plan() if n_tok == len(seqs) else None
        dec = _DecodeBatch.build(seqs, n_tok, window) if self.batched_decode and plan is None else None
        # (built once here rather than in each layer's _attend)
        if self._cache_ops is not None and dec is None and plan is None:
            for s in seqs:
                if s.count == 1:
                    s.where = (torch.tensor([s.slot]), torch.tensor([s.total]))

        if not self.spec.has_embedding:
            h = x.to(self.dtype)
        elif isinstance(self.embed, torch.Tensor):
            h = F.embedding(x, self.embed).to(self.dtype)
        else:
            h = lookup(self.embed, x)
        if self.spec.has_embedding and self.cfg.embed_scale != 1.0:
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        if plan is not None:  # one new token per sequence: every layer in one call
            h = plan.run(h.contiguous(), cache.k, cache.v, slot_idx, pos, cos, sin, all_reduce)
        for li, layer in enumerate(self.layers if plan is None else ()):
            c, s_ = local if layer.sliding else (cos, sin)
            h = self._block(li, layer, h, c, s_, seqs, dec, slot_idx, pos, cache, all_reduce)
        cache.commit(seq_ids, token_counts)
        if not self.spec.has_output:
            return h
        if output == "logits":
            h = h[torch.tensor([s.offset + s.count - 1 for s in seqs])] if n_tok != len(seqs) else h
        h = self._rms_norm(h, self.norm)
        if output == "hidden":
            return h.float()
        assert self.lm_head is not None
        logits = linear(h, self.lm_head).float()
        if self.cfg.final_softcap:  # gemma2: cap · tanh(logits / cap) (transformers' Gemma2ForCausalLM)
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    __call__ = forward

    def _fused_plan(self) -> Any:
        """The decode plan of model/fused_decode.py (built once), or None where it does not apply or is turned off."""
        if not self.fused_decode:
            return None
        if self._decode_plan is None:
            self._decode_plan = fused_decode.build(self) or False
        return self._decode_plan or None

    def _check_inputs(self, x: torch.Tensor, seq_ids: list[int], token_counts: list[int], output: str) -> int:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if not seq_ids or len(seq_ids) != len(token_counts):
            raise ValueError(f"need one token count per sequence: {len(seq_ids)} seq_ids, {len(token_counts)} counts")
        if min(token_counts) <= 0:
            raise ValueError(f"every sequence needs at least one new token, got counts {token_counts}")
        n_tok = sum(token_counts)
        if self.spec.has_embedding:
            if x.dim() != 1 or x.shape[0] != n_tok or x.dtype != torch.int64:
                raise ValueError(f"expected int64 token ids of shape ({n_tok},), got {x.dtype} {tuple(x.shape)}")
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token id out of range [0, {self.cfg.vocab_size}): min {lo}, max {hi}")
        elif x.dim() != 2 or tuple(x.shape) != (n_tok, self.cfg.hidden_size):
            raise ValueError(f"expected hidden states of shape ({n_tok}, {self.cfg.hidden_size}), got {tuple(x.shape)}")
        return n_tok

    def _rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._ops is not None:
            return self._ops.rms_norm(x.contiguous(), w, self.cfg.rms_norm_eps)
        if x.dtype == torch.float32:  # (also every quantised shard: float32 stream, see __init__)
            return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)
        # Low precision: normalise in float32, scale in the model dtype (as transformers' LlamaRMSNorm).
        return w * F.rms_norm(x.float(), (x.shape[-1],), None, self.cfg.rms_norm_eps).to(x.dtype)

    def _block(
        self,
        li: int,
        layer: _Layer,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        seqs: list[_Seq],
        dec: _DecodeBatch | None,
        slot_idx: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache,
        all_reduce: AllReduce | None,
    ) -> torch.Tensor:
        n_tok, hd = h.shape[0], self.cfg.head_dim
        qkv = linear(self._rms_norm(h, layer.attn_norm), layer.wqkv, layer.bqkv)
        if layer.q_norm is not None or self._q_factor != 1.0:
            qkv = self._qk_prepare(layer, qkv)
        if cache.is_ring(li):
            attn = self._ring_attention(li, qkv, cos, sin, seqs, slot_idx, pos, cache)
        else:
            attn = self._attention(li, layer.sliding, qkv, cos, sin, seqs, dec, slot_idx, pos, cache)
        out = linear(attn, layer.wo)
        if all_reduce is not None:
            out = all_reduce(out)
        if layer.post_attn_norm is not None:  # (on the summed output: a norm over the whole hidden vector)
            out = self._rms_norm(out, layer.post_attn_norm)
        h = h + out
        if layer.moe is not None:  # this shard's experts' part of the sum (the all-reduce adds the others')
            out = layer.moe(self._rms_norm(h, layer.ffn_norm))
        else:
            gu = linear(self._rms_norm(h, layer.ffn_norm), layer.wgu)
            gate, up = gu.split(self.ffn_local, dim=-1)
            act = F.silu(gate) if self.cfg.activation == "silu" else F.gelu(gate, approximate="tanh")
            out = linear(act * up, layer.wdown)
        if all_reduce is not None:
            out = all_reduce(out)
        if layer.post_ffn_norm is not None:
            out = self._rms_norm(out, layer.post_ffn_norm)
        return h + out

    def _attention(self, li: int, sw: bool, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   seqs: list[_Seq], dec: _DecodeBatch | None, slot_idx: torch.Tensor, pos: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """RoPE, cache write and attention of a layer whose cache holds every position; returns (N, heads * hd).
        sw: a sliding-window layer (its window applied by masks: a cache made without rings)."""
        n_tok, hd = qkv.shape[0], self.cfg.head_dim
        if self._cache_ops is not None:  # all of the below in one pass
            q = self._cache_ops.rope_cache(qkv, cos, sin, *cache.layer(li), slot_idx, pos, self.n_heads, self.n_kv)
        else:
            # q and k are adjacent columns of qkv: rotate them as one (N, heads + kv, hd) tensor (half the ops).
            qk = rope.apply(qkv[:, : self.q_dim + self.kv_dim].view(n_tok, self.n_heads + self.n_kv, hd), cos, sin)
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]  # (N, heads, hd), (N, kv, hd)
            v = qkv[:, self.q_dim + self.kv_dim :]
            cache.write(li, slot_idx, pos, k, v.view(n_tok, self.n_kv, hd))
        if dec is None:
            attn = (torch.cat([self._attend(q, cache, li, s, sw) for s in seqs]) if len(seqs) > 1
                    else self._attend(q, cache, li, seqs[0], sw))
        elif dec.packed is None:  # pure decode step: every row is one sequence's token
            attn = self._attend_decode(q, cache, li, dec, sw)
        else:  # mixed step: decode rows together, prompt chunks one by one
            attn = q.new_empty(n_tok, self.q_dim)
            attn[dec.packed] = self._attend_decode(q[dec.packed], cache, li, dec, sw)
            for s in seqs:
                if s.count > 1:
                    attn[s.offset : s.offset + s.count] = self._attend(q, cache, li, s, sw)
        return attn

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
        """torch's SDPA (default scale; q carries cfg.attention_scale), or for gemma2 the same with the scores
        soft-capped before the softmax: cap · tanh(s / cap) (transformers' eager_attention_forward)."""
        cap = self.cfg.attn_softcap
        if not cap:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                  enable_gqa=enable_gqa)
        if enable_gqa and k.shape[-3] != q.shape[-3]:  # (B, kv, T, hd) -> (B, heads, T, hd)
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        s = torch.tanh(s / cap) * cap
        if is_causal:
            attn_mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril(s.shape[-1] - s.shape[-2])
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf"))
        return torch.softmax(s, -1).to(v.dtype) @ v

    def _qk_prepare(self, layer: _Layer, qkv: torch.Tensor) -> torch.Tensor:
        """qkv with q and k RMS-normalised per head (qwen3, gemma3: one (head_dim,) weight for all heads, before
        RoPE, as transformers' Qwen3Attention / Gemma3Attention) and q multiplied by the attention-scale factor."""
        n_tok, hd = qkv.shape[0], self.cfg.head_dim
        q = qkv[:, : self.q_dim].reshape(n_tok * self.n_heads, hd)
        k = qkv[:, self.q_dim : self.q_dim + self.kv_dim].reshape(n_tok * self.n_kv, hd)
        if layer.q_norm is not None:
            q, k = self._rms_norm(q, layer.q_norm), self._rms_norm(k, layer.k_norm)
        if self._q_factor != 1.0:
            q = q * self._q_factor
        return torch.cat([q.view(n_tok, self.q_dim), k.view(n_tok, self.kv_dim), qkv[:, self.q_dim + self.kv_dim :]], 1)

    def _widened(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys and values in the compute dtype. Our decode kernel (cpu_kernels.cpp attend_cached) widens a
        float16 cache's elements to float32 and computes in float32, so torch's paths (prompts, chunks, masks, and
        the prefill that replays a sequence onto a new executor after a failure) do the same math: a replayed
        prefix then gives back its decode-time logits to float32 rounding (~1e-6), not float16's (~1e-4), which is
        what lets recovery continue a greedy text unchanged."""
        return keys.to(self.dtype), values.to(self.dtype)

    def _attend_decode(self, q: torch.Tensor, cache: KVCache, li: int, dec: _DecodeBatch, sliding: bool = False) -> torch.Tensor:
        """One masked SDPA for all decode sequences (see _DecodeBatch); q (B, heads, hd) -> (B, heads * hd).
        A sliding-window layer takes torch's path with the window mask (the fused kernel attends [0, length))."""
        if self._cache_ops is not None and not sliding:  # each sequence over its own length, no padding or mask
            return self._cache_ops.attend_cached(q.contiguous(), *cache.layer(li), dec.slots, dec.lengths)
        b, hd, g = q.shape[0], self.cfg.head_dim, self.n_heads // self.n_kv
        keys, values = self._widened(*cache.span(li, slice(dec.lo, dec.hi), dec.t_max))  # (S, kv, t_max, hd)
        qg = q.reshape(b, self.n_kv, g, hd)  # GQA: a KV head's query heads are its query rows (no repeat_kv)
        if dec.rows is not None:
            qg = q.new_zeros(dec.hi - dec.lo, self.n_kv, g, hd).index_copy_(0, dec.rows, qg)
        mask = dec.window_mask if sliding else dec.mask
        o = self._sdpa(qg, keys, values, attn_mask=mask)  # (S, kv, g, hd)
        if dec.rows is not None:
            o = o[dec.rows]
        return o.reshape(b, self.q_dim).to(self.dtype)

    def _attend(self, q: torch.Tensor, cache: KVCache, li: int, s: _Seq, sliding: bool = False) -> torch.Tensor:
        """Causal attention of one sequence's new queries over its cached keys; returns (count, heads * hd).
        sliding: the query at position p sees keys (p - sliding_window, p] only."""
        window = self.cfg.sliding_window if sliding and s.total > self.cfg.sliding_window else 0
        if s.where is not None and not window:
            return self._cache_ops.attend_cached(q[s.offset : s.offset + 1], *cache.layer(li), *s.where)
        if window:
            return self._attend_window(q, cache, li, s, window)
        keys, values = self._widened(*cache.span(li, s.slot, s.total))  # (kv, total, hd)
        hd = self.cfg.head_dim
        if s.count == 1:
            # One query per head sees the whole prefix: no mask. The query heads of a GQA group become that
            # KV head's "query rows", so the cached keys are used as they are (no repeat_kv copy).
            # 4-D inputs: torch's CPU SDPA takes its fused (flash) kernel only for 4-D tensors; 3-D ones fall back
            # to the math path (bmm + softmax + bmm, three parallel regions): measured 36 us vs 15 us per call.
            qg = q[s.offset].view(1, self.n_kv, self.n_heads // self.n_kv, hd)
            return self._sdpa(qg, keys[None], values[None]).reshape(1, self.q_dim).to(self.dtype)
        qs = q[s.offset : s.offset + s.count].transpose(0, 1)[None]  # (1, heads, count, hd)
        if s.mask is None:  # fresh prompt: plain causal (square) mask
            o = self._sdpa(qs, keys[None], values[None], is_causal=True, enable_gqa=True)
        else:
            o = self._sdpa(qs, keys[None], values[None], attn_mask=s.mask, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(s.count, self.q_dim).to(self.dtype)

    def _ring_attention(self, li: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqs: list[_Seq],
                        slot_idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """RoPE, cache write and attention of a sliding-window layer whose cache is a ring of W = window positions
        (model/kv_cache.py): returns (N, heads * hd).

        A decoding token at p is written at p % W first; the ring then holds exactly its keys (p - W, p], so it
        attends over min(p + 1, W) entries with no mask (our fused kernel where it applies). A prompt chunk at
        [start, total) reads the keys [start - W + 1, start) it needs from the ring *before* its own tokens
        overwrite them, attends over those plus its new keys under the window mask, and then keeps its last W."""
        W, hd, n_tok = cache.window, self.cfg.head_dim, qkv.shape[0]
        kc, vc = cache.layer(li)
        if all(s.count == 1 for s in seqs):
            lengths = torch.tensor([min(s.total, W) for s in seqs])
            if self._cache_ops is not None:
                q = self._cache_ops.rope_cache(qkv, cos, sin, kc, vc, slot_idx, pos % W, self.n_heads, self.n_kv)
                return self._cache_ops.attend_cached(q.contiguous(), kc, vc, slot_idx, lengths)
        qk = rope.apply(qkv[:, : self.q_dim + self.kv_dim].view(n_tok, self.n_heads + self.n_kv, hd), cos, sin)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]  # (N, heads, hd), (N, kv, hd)
        v = qkv[:, self.q_dim + self.kv_dim :].view(n_tok, self.n_kv, hd)
        before = {}
        for i, s in enumerate(seqs):  # what chunks need from the ring, read before this step's writes
            start = s.total - s.count
            if s.count > 1 and start > 0:
                before[i] = cache.ring_span(li, s.slot, max(0, start - W + 1), start)
        total = torch.tensor([s.total for s in seqs]).repeat_interleave(torch.tensor([s.count for s in seqs]))
        keep = pos >= total - W  # a chunk longer than the window keeps its last W tokens
        cache.write(li, slot_idx[keep], pos[keep] % W, k[keep], v[keep])
        attn = q.new_empty(n_tok, self.q_dim)
        for i, s in enumerate(seqs):
            rows = slice(s.offset, s.offset + s.count)
            if s.count == 1:
                keys, values = self._widened(*cache.span(li, s.slot, min(s.total, W)))
                qg = q[s.offset].view(1, self.n_kv, self.n_heads // self.n_kv, hd)
                o = self._sdpa(qg, keys[None], values[None])
                attn[rows] = o.reshape(1, self.q_dim).to(self.dtype)
                continue
            # the chunk's own keys as the cache would hand them back (its element type, q8_0 rounding)
            keys, values = cache.as_stored(k[rows].transpose(0, 1)), cache.as_stored(v[rows].transpose(0, 1))
            start = s.total - s.count
            lo = start
            if i in before:
                old_k, old_v = before[i]
                lo = start - old_k.shape[1]
                keys, values = torch.cat([old_k, keys], 1), torch.cat([old_v, values], 1)
            keys, values = self._widened(keys, values)
            p_ = torch.arange(start, s.total)[:, None]
            kp = torch.arange(lo, s.total)[None, :]
            mask = (kp <= p_) & (kp > p_ - W)
            qs = q[rows].transpose(0, 1)[None]  # (1, heads, count, hd)
            o = self._sdpa(qs, keys[None], values[None], attn_mask=mask, enable_gqa=True)
            attn[rows] = o[0].transpose(0, 1).reshape(s.count, self.q_dim).to(self.dtype)
        return attn

    def _attend_window(self, q: torch.Tensor, cache: KVCache, li: int, s: _Seq, window: int) -> torch.Tensor:
        """_attend for a sliding-window layer once the sequence is longer than the window: the new queries at
        positions [start, total) read keys [start - window + 1, total), masked to (p - window, p] for each p."""
        start = s.total - s.count
        lo = max(0, start - window + 1)
        keys, values = cache.span(li, s.slot, s.total)
        keys, values = self._widened(keys[:, lo:], values[:, lo:])  # (kv, total - lo, hd)
        qs = q[s.offset : s.offset + s.count].transpose(0, 1)[None]  # (1, heads, count, hd)
        p = torch.arange(start, s.total)[:, None]
        k = torch.arange(lo, s.total)[None, :]
        mask = (k <= p) & (k > p - window)
        o = self._sdpa(qs, keys[None], values[None], attn_mask=mask, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(s.count, self.q_dim).to(self.dtype)
