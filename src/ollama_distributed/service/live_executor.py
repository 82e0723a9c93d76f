"""`LiveExecutor`: the wrapper the server puts around every replica's executor.

It counts the KV caches the executor holds (sequences stepped and not yet freed, shown as `kv_sequences` in
/api/distributed/status: proof that finished and cancelled requests are freed), gives the router a per-replica
lock (service/router.py `locked_submission`), and lets recovery swap the inner executor while the engine keeps
the same object (`rebind`). Constraints no longer live here: they travel with each request's sampler
(service/grammar, model/sampling.py), so the wrapper never edits logits and passes `step_sampled` through (a
Ray pipeline then samples on its last stage).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from ..model.sampling import sample_batch


class LiveExecutor:
    """Wraps an Executor (see module docstring); every other attribute passes through to `inner`."""

    def __init__(self, inner: Any, tokenizer: Any = None) -> None:
        self.inner = inner
        self.tokenizer = tokenizer
        self.lock = threading.Lock()  # the router's per-replica submission lock; held by step
        self._live: set[int] = set()

    @property
    def live_sequences(self) -> int:
        """KV caches currently held: observable proof that cancelled/finished sequences were freed."""
        return len(self._live)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def max_seq_len(self) -> int:
        return self.inner.max_seq_len

    def rebind(self, inner: Any) -> None:
        """Serve from a fresh `inner` executor after a failure (the engine replays every sequence onto it)."""
        with self.lock:
            self.inner = inner
            self._live.clear()

    def step(self, seq_ids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        with self.lock:
            self._live.update(seq_ids)
            return self.inner.step(seq_ids, tokens)

    def step_sampled(self, seq_ids: list[int], tokens: list[list[int]], samplers: Sequence[Any],
                     histories: Sequence[Sequence[int] | None]) -> list[int | None]:
        """`step` then sample rows with a sampler (runtime.engine uses this when the executor defines it): the
        inner executor's own `step_sampled` when it has one (a Ray pipeline samples on its last stage), else
        `model.sampling.sample_batch` here on the logits, exactly as the engine would."""
        # only a method of the inner executor's class counts: a wrapper forwarding attributes (router.py
        # SlowedExecutor) must keep its own `step` in the path
        own = self.inner.step_sampled if getattr(type(self.inner), "step_sampled", None) is not None else None
        with self.lock:
            self._live.update(seq_ids)
            if own is not None:
                return own(seq_ids, tokens, samplers, histories)
            logits = self.inner.step(seq_ids, tokens)
        rows = [i for i, s in enumerate(samplers) if s is not None]
        out: list[int | None] = [None] * len(seq_ids)
        if rows:
            picked = logits[rows] if len(rows) != len(seq_ids) else logits
            toks = sample_batch(picked, [samplers[i] for i in rows], [histories[i] or () for i in rows])
            for i, t in zip(rows, toks):
                out[i] = t
        return out

    def free(self, seq_id: int) -> None:
        with self.lock:
            self._live.discard(seq_id)
        self.inner.free(seq_id)

    def embed(self, tokens: list[int]) -> torch.Tensor:
        return self.inner.embed(tokens)

    def close(self) -> None:
        self.inner.close()
