"""Per-sequence key/value cache of one shard (its layers, its KV heads).

Storage is slot-major per layer: k[layer] is (slots, kv_heads, capacity, head_dim). Each live sequence owns a slot;
the new tokens of a whole ragged batch are written with one `index_put_` per layer (slot and position index
tensors), and a sequence's cached keys are the view k[layer, slot, :, :length] — no gather, no copy. Slots and
capacity grow by doubling (amortised O(1) per token), capacity never past max_seq_len.

Element types: float32 / bfloat16 / float16 tensors, or Q8_0 (Ollama's OLLAMA_KV_CACHE_TYPE=q8_0, ggml's
block_q8_0: int8 values with one float16 scale per 32 along head_dim, d = max|x| / 127; 34 bytes per 32 elements
instead of f16's 64). A Q8_0 cache is written through `write` and read through `span`, which dequantises only the
positions attended; the fused CPU kernels take float32/float16 caches only (model/transformer.py).

Sliding-window layers (gemma3: 5 of every 6 layers attend over the last `window` positions only) keep a ring of
`window` positions instead: position p lives at index p % window, so after writing p the ring holds exactly the
keys (p - window, p] that a query at p reads, in rotated order (softmax attention does not depend on key order;
RoPE was applied before the write). Their storage (`rk`, `rv`) is stacked apart from the other layers' (`k`, `v`)
and never grows past the window, so a 32k context of Gemma 3 holds 32k positions in 1 layer of 6 and 512 in 5.
"""

from __future__ import annotations

import torch

from .errors import ContextLengthError

Q8_BLOCK = 32  # QK8_0 in ggml-common.h
Q8_0 = "q8_0"  # the element type name of a quantised cache (KVCache dtype argument)


class KVCache:
    """KV cache keyed by int seq_id. Positions of a sequence's new tokens continue from `length(seq_id)`."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        dtype: torch.dtype | str = torch.float32,
        initial_slots: int = 4,
        initial_capacity: int = 256,
        ring_layers: tuple[bool, ...] = (),
        window: int = 0,
    ) -> None:
        """ring_layers: per layer, whether it keeps only the last `window` positions (a ring, see module doc);
        ignored when the window covers max_seq_len anyway."""
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be > 0, got {max_seq_len}")
        if any(ring_layers) and (window <= 0 or len(ring_layers) != n_layers):
            raise ValueError(f"ring layers need a window > 0 and one flag per layer, got {window}, {ring_layers}")
        self.window = window if any(ring_layers) and window < max_seq_len else 0
        # layer -> (is_ring, index in its stack)
        rings = [bool(r) and self.window > 0 for r in (ring_layers or (False,) * n_layers)]
        self._where = [(r, sum(1 for x in rings[:i] if x == r)) for i, r in enumerate(rings)]
        n_ring = sum(rings)
        self.quantized = dtype == Q8_0
        if self.quantized and head_dim % Q8_BLOCK:
            raise ValueError(f"a q8_0 KV cache needs head_dim in blocks of {Q8_BLOCK}, got {head_dim}")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self._slot: dict[int, int] = {}
        self._len: dict[int, int] = {}
        self._free: list[int] = []
        cap = min(initial_capacity, max_seq_len)
        self.k, self.v, self.k_scale, self.v_scale = self._storage((n_layers - n_ring, initial_slots, n_kv_heads, cap, head_dim))
        self.rk, self.rv, self.rk_scale, self.rv_scale = self._storage(
            (n_ring, initial_slots, n_kv_heads, min(cap, self.window or cap), head_dim))
        self._free = list(range(initial_slots - 1, -1, -1))

    def _storage(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Zeroed k, v (and, for q8_0, their per-block float16 scales) of `shape`."""
        if not self.quantized:
            return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype), None, None
        scales = (*shape[:-1], shape[-1] // Q8_BLOCK)
        return (torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8),
                torch.zeros(scales, dtype=torch.float16), torch.zeros(scales, dtype=torch.float16))

    def is_ring(self, layer: int) -> bool:
        """Whether `layer` keeps only the last `window` positions (index = position % window)."""
        return self._where[layer][0]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v storage of `layer`: (slots, kv_heads, capacity, head_dim) each (a ring layer's capacity <= window)."""
        ring, j = self._where[layer]
        return (self.rk[j], self.rv[j]) if ring else (self.k[j], self.v[j])

    def _scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ring, j = self._where[layer]
        ks, vs = (self.rk_scale, self.rv_scale) if ring else (self.k_scale, self.v_scale)
        return (None, None) if ks is None else (ks[j], vs[j])

    def ring_span(self, layer: int, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end) of a ring layer, in position order (end - start <= window)."""
        assert self.is_ring(layer) and 0 <= end - start <= self.window
        idx = torch.arange(start, end) % self.window
        k, v = self.layer(layer)
        ks, vs = self._scales(layer)
        out = []
        for store, scale in ((k, ks), (v, vs)):
            x = store[slot].index_select(1, idx)
            if scale is not None:
                x = _dequant(x, scale[slot].index_select(1, idx))
            out.append(x)
        return out[0], out[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype `span` returns (float32 for a q8_0 cache)."""
        return torch.float32 if self.quantized else self.dtype

    # -- element access (the torch path of model/transformer.py) --------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows k, v (N, kv_heads, head_dim) at (slots[i], positions[i]) of `layer` (a ring layer's positions
        are indices: position % window)."""
        (ks, vs), (kscale, vscale) = self.layer(layer), self._scales(layer)
        for store, scale, x in ((ks, kscale, k), (vs, vscale, v)):
            if scale is None:
                store[slots, :, positions] = x.to(store.dtype)
                continue
            q, d = _quant(x)
            store[slots, :, positions] = q
            scale[slots, :, positions] = d

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x (..., head_dim) as `span` would hand them back after a write: cast, or q8_0-rounded."""
        return _dequant(*_quant(x)) if self.quantized else x.to(self.dtype)

    def span(self, layer: int, slots: int | slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `slots` (one slot or a range) at positions [0, length) of `layer`: views of a float
        cache, dequantised copies (float32) of a q8_0 one."""
        (k, v), (ks, vs) = self.layer(layer), self._scales(layer)
        k, v = k[slots, :, :length], v[slots, :, :length]
        if ks is None:
            return k, v
        return _dequant(k, ks[slots, :, :length]), _dequant(v, vs[slots, :, :length])

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def length(self, seq_id: int) -> int:
        """Tokens cached for seq_id (0 for an unknown sequence)."""
        return self._len.get(seq_id, 0)

    def free(self, seq_id: int) -> None:
        """Forget seq_id and recycle its slot (no-op for an unknown sequence)."""
        slot = self._slot.pop(seq_id, None)
        self._len.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)

    def rewind(self, seq_id: int, n: int) -> None:
        """Forget seq_id's last n positions (the next write overwrites them). A sliding-window layer's ring slot
        that held position p - window, overwritten by position p, is not needed again: position p, rewritten,
        attends to p - window + 1 … p only."""
        have = self._len.get(seq_id, 0)
        if not 0 <= n <= have:
            raise ValueError(f"sequence {seq_id}: cannot rewind {n} of {have} cached positions")
        self._len[seq_id] = have - n

    def seq_ids(self) -> list[int]:
        return list(self._slot)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        tensors = (self.k, self.v, self.k_scale, self.v_scale, self.rk, self.rv, self.rk_scale, self.rv_scale)
        return sum(t.element_size() * t.nelement() for t in tensors if t is not None)

    # -- used by ModelShard.forward ----------------------------------------------------------------------------
    def prepare(self, seq_ids: list[int], token_counts: list[int]) -> tuple[list[int], list[int]]:
        """Slots and start positions for appending token_counts[i] tokens to seq_ids[i]; grows storage.

        Lengths are not advanced until `commit`, so a failed forward leaves the cache as it was.
        """
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate seq_ids in one batch: {seq_ids}")
        starts = [self._len.get(s, 0) for s in seq_ids]
        need = 0
        for sid, start, count in zip(seq_ids, starts, token_counts):
            if start + count > self.max_seq_len:
                raise ContextLengthError(
                    f"sequence {sid}: {start} cached + {count} new tokens exceeds the context length {self.max_seq_len}"
                )
            need = max(need, start + count)
        new = [s for s in seq_ids if s not in self._slot]
        if len(new) > len(self._free) or need > self.capacity:
            self._grow(len(self._slot) + len(new), need)
        for sid in new:
            self._slot[sid] = self._free.pop()
            self._len[sid] = 0
        return [self._slot[s] for s in seq_ids], starts

    def commit(self, seq_ids: list[int], token_counts: list[int]) -> None:
        for sid, count in zip(seq_ids, token_counts):
            self._len[sid] += count

    def slot(self, seq_id: int) -> int:
        return self._slot[seq_id]

    def _grow(self, slots_needed: int, capacity_needed: int) -> None:
        old_slots, cap = self.k.shape[1], self.capacity
        slots = old_slots
        while slots < slots_needed:
            slots *= 2
        while cap < capacity_needed:
            cap = min(cap * 2, self.max_seq_len)
        used = max(self._len.values(), default=0)
        new = self._storage((self.k.shape[0], slots, self.n_kv_heads, cap, self.head_dim))
        old = (self.k, self.v, self.k_scale, self.v_scale)
        for dst, src in zip(new, old):
            if src is not None:
                dst[:, :old_slots, :, :used] = src[:, :, :, :used]
        self.k, self.v, self.k_scale, self.v_scale = new
        # ring layers: capacity min(cap, window); a ring wraps only once it is full (capacity = window), so a
        # smaller one holds positions [0, used) at their own indices and its prefix copies over unchanged
        ring_cap = min(cap, self.window or cap)
        ring_used = min(used, self.rk.shape[3])
        new = self._storage((self.rk.shape[0], slots, self.n_kv_heads, ring_cap, self.head_dim))
        old = (self.rk, self.rv, self.rk_scale, self.rv_scale)
        for dst, src in zip(new, old):
            if src is not None:
                dst[:, :old_slots, :, :ring_used] = src[:, :, :, :ring_used]
        self.rk, self.rv, self.rk_scale, self.rv_scale = new
        self._free = list(range(slots - 1, old_slots - 1, -1)) + self._free


def _quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's quantize_row_q8_0: d = amax / 127 per block of 32, q = round(x / d); (int8 values, float16 scales)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, Q8_BLOCK)
    d = blocks.abs().amax(-1) / 127
    q = torch.where(d[..., None] > 0, blocks / d[..., None], torch.zeros_like(blocks)).round_()
    return q.to(torch.int8).reshape(x.shape), d.to(torch.float16)


def _dequant(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q8_0 values times their per-32 float16 scales, as float32."""
    return (q.float().unflatten(-1, (-1, Q8_BLOCK)) * d.float()[..., None]).flatten(-2)
