"""Per-sequence key/value cache of one shard (its layers, its KV heads).

Storage is slot-major per layer: k[layer] is (slots, kv_heads, capacity, head_dim). Each live sequence owns a slot;
the new tokens of a whole ragged batch are written with one `index_put_` per layer (slot and position index
tensors), and a sequence's cached keys are the view k[layer, slot, :, :length] — no gather, no copy. Slots and
capacity grow by doubling (amortised O(1) per token), capacity never past max_seq_len.

Element types: float32 / bfloat16 / float16 tensors, or Q8_0 (Ollama's OLLAMA_KV_CACHE_TYPE=q8_0, ggml's
block_q8_0: int8 values with one float16 scale per 32 along head_dim, d = max|x| / 127; 34 bytes per 32 elements
instead of f16's 64). A Q8_0 cache is written through `write` and read through `span`, which dequantises only the
positions attended; the fused CPU kernels take float32/float16 caches only (model/transformer.py).
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
    ) -> None:
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be > 0, got {max_seq_len}")
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
        self.k, self.v, self.k_scale, self.v_scale = self._storage((n_layers, initial_slots, n_kv_heads, cap, head_dim))
        self._free = list(range(initial_slots - 1, -1, -1))

    def _storage(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Zeroed k, v (and, for q8_0, their per-block float16 scales) of `shape`."""
        if not self.quantized:
            return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype), None, None
        scales = (*shape[:-1], shape[-1] // Q8_BLOCK)
        return (torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8),
                torch.zeros(scales, dtype=torch.float16), torch.zeros(scales, dtype=torch.float16))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype `span` returns (float32 for a q8_0 cache)."""
        return torch.float32 if self.quantized else self.dtype

    # -- element access (the torch path of model/transformer.py) --------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows k, v (N, kv_heads, head_dim) at (slots[i], positions[i]) of `layer`."""
        for store, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if scale is None:
                store[layer][slots, :, positions] = x.to(store.dtype)
                continue
            # ggml's quantize_row_q8_0: d = amax / 127 per block, q = round(x / d)
            blocks = x.float().reshape(*x.shape[:-1], -1, Q8_BLOCK)
            d = blocks.abs().amax(-1) / 127
            q = torch.where(d[..., None] > 0, blocks / d[..., None], torch.zeros_like(blocks)).round_()
            store[layer][slots, :, positions] = q.to(torch.int8).reshape(x.shape)
            scale[layer][slots, :, positions] = d.to(torch.float16)

    def span(self, layer: int, slots: int | slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `slots` (one slot or a range) at positions [0, length) of `layer`: views of a float
        cache, dequantised copies (float32) of a q8_0 one."""
        k, v = self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]
        if not self.quantized:
            return k, v
        ks, vs = self.k_scale[layer, slots, :, :length], self.v_scale[layer, slots, :, :length]

        def dequant(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            x = q.float().unflatten(-1, (-1, Q8_BLOCK)) * d.float()[..., None]
            return x.flatten(-2)

        return dequant(k, ks), dequant(v, vs)

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

    def seq_ids(self) -> list[int]:
        return list(self._slot)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        scales = 0 if self.k_scale is None else self.k_scale.element_size() * self.k_scale.nelement() * 2
        return self.k.element_size() * self.k.nelement() * 2 + scales

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
        new = self._storage((self.n_layers, slots, self.n_kv_heads, cap, self.head_dim))
        old = (self.k, self.v, self.k_scale, self.v_scale)
        for dst, src in zip(new, old):
            if src is not None:
                dst[:, :old_slots, :, :used] = src[:, :, :, :used]
        self.k, self.v, self.k_scale, self.v_scale = new
        self._free = list(range(slots - 1, old_slots - 1, -1)) + self._free
