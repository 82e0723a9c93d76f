"""The interface between the engine (requests, batching, sampling) and whatever computes logits.

`LocalExecutor` (local_executor.py) holds a whole model in this process; the Ray executor holds pipeline stages
and tensor-parallel shards on other nodes. The engine only ever talks to this Protocol, from ONE thread, so
executors need not be thread-safe.

Sequence ids are small ints chosen by the engine. An executor keeps one KV cache per sequence id; `step` appends
the given tokens to that sequence's cache (positions continue from what it already holds), `free` drops it.
Re-using a freed id starts a fresh sequence. Feeding a sequence again from position 0 after `free` is how the
engine replays a sequence onto a new executor after a failure.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..model.config import ModelConfig


class ExecutorError(RuntimeError):
    """An executor could not run a step (a node died, a cache is full, ...). The engine ends the affected
    requests with the message as their error."""


class ShardLostError(ExecutorError):
    """Shards of a distributed plan stopped working (a hung process found by the step time-out's liveness
    probe, runtime/step_timeout.py). `nodes`: names of the nodes whose shards were lost, for recovery's
    bookkeeping (runtime/recovery.py classify_failure)."""

    def __init__(self, message: str, nodes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.nodes = tuple(nodes)


class CacheFullError(ExecutorError):
    """A sequence would grow past the executor's `max_seq_len`."""


@runtime_checkable
class Executor(Protocol):
    """What the engine needs from a model runner."""

    config: ModelConfig
    max_seq_len: int  # the most tokens one sequence's KV cache holds

    def step(self, seq_ids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Feed each sequence its new tokens (a prefill chunk or one decode token).

        Returns (len(seq_ids), vocab) float32 logits of each sequence's LAST new token, row i for seq_ids[i].
        """
        ...

    def embed(self, tokens: list[int]) -> torch.Tensor:
        """(hidden,) mean over positions of the final-normed hidden states; uses no persistent cache."""
        ...

    def free(self, seq_id: int) -> None:
        """Drop the sequence's KV cache everywhere (unknown ids are ignored)."""
        ...

    def close(self) -> None:
        """Release every resource; the executor is unusable afterwards."""
        ...
