"""Per-sequence key/value cache of one shard (its layers, its KV heads).

Storage is slot-major per layer: k[layer] is (slots, kv_heads, capacity, head_dim). Each live sequence owns a slot;
the new tokens of a whole ragged batch are written with one `index_put_` per layer (slot and position index
tensors), and a sequence's cached keys are the view k[layer, slot, :, :length] — no gather, no copy. Slots and
capacity grow by doubling (amortised O(1) per token), capacity never past max_seq_len.
"""

from __future__ import annotations

import torch

from .errors import ContextLengthError


class KVCache:
    """KV cache keyed by int seq_id. Positions of a sequence's new tokens continue from `length(seq_id)`."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        initial_slots: int = 4,
        initial_capacity: int = 256,
    ) -> None:
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be > 0, got {max_seq_len}")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self._slot: dict[int, int] = {}
        self._len: dict[int, int] = {}
        self._free: list[int] = []
        cap = min(initial_capacity, max_seq_len)
        self.k = torch.zeros((n_layers, initial_slots, n_kv_heads, cap, head_dim), dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self._free = list(range(initial_slots - 1, -1, -1))

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
        return self.k.element_size() * self.k.nelement() * 2

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
        shape = (self.n_layers, slots, self.n_kv_heads, cap, self.head_dim)
        k, v = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        k[:, :old_slots, :, :used] = self.k[:, :, :, :used]
        v[:, :old_slots, :, :used] = self.v[:, :, :, :used]
        self.k, self.v = k, v
        self._free = list(range(slots - 1, old_slots - 1, -1)) + self._free
