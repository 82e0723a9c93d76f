"""In-process tensor and pipeline parallelism: several ModelShards of one model driven from one process.

Used by the equivalence tests (sharded == unsharded) and usable by an in-process executor. The shards of a
stage run in threads (torch ops release the GIL) and meet in a `ThreadAllReduce`, a barrier-based sum whose
result every rank reads in the same rank order, so all ranks continue from bit-identical residual streams —
the same guarantee a real all-reduce gives. Pipeline stages chain by feeding one stage's hidden states into
the next.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .config import ModelConfig
from .kv_cache import KVCache
from .shard import ShardSpec
from .transformer import ModelShard
from .weights import load_weights, read_config


class ThreadAllReduce:
    """Sum a tensor over `world` threads: `ThreadAllReduce(world).for_rank(r)` is rank r's all_reduce."""

    def __init__(self, world: int, timeout: float = 300.0) -> None:
        self.world = world
        self._parts: list[torch.Tensor | None] = [None] * world
        self._barrier = threading.Barrier(world, timeout=timeout)

    def for_rank(self, rank: int):  # -> Callable[[Tensor], Tensor]
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            if self.world == 1:
                return t
            self._parts[rank] = t
            self._barrier.wait()  # every part is in
            total = self._parts[0]
            for part in self._parts[1:]:
                total = total + part  # type: ignore[operator]
            self._barrier.wait()  # every rank has read the parts before any rank overwrites its slot
            return total  # type: ignore[return-value]

        return all_reduce

    def abort(self) -> None:
        """Release ranks blocked in the barrier (they raise BrokenBarrierError) after another rank failed."""
        self._barrier.abort()


class LocalStage:
    """The tensor-parallel shards of one pipeline stage, run in threads."""

    def __init__(self, shards: list[ModelShard]) -> None:
        if not shards:
            raise ValueError("a stage needs at least one shard")
        self.shards = shards
        self._pool = ThreadPoolExecutor(max_workers=len(shards)) if len(shards) > 1 else None

    def new_cache(self, max_seq_len: int) -> list[KVCache]:
        return [s.new_cache(max_seq_len) for s in self.shards]

    def forward(self, x: torch.Tensor, seq_ids: list[int], token_counts: list[int], caches: list[KVCache], output: str = "logits") -> torch.Tensor:
        """Run every shard; returns the output of the shard holding the output head (else rank 0's hidden)."""
        if self._pool is None:
            return self.shards[0].forward(x, seq_ids, token_counts, caches[0], None, output)
        group = ThreadAllReduce(len(self.shards))

        def run(rank: int) -> torch.Tensor:
            try:
                return self.shards[rank].forward(x, seq_ids, token_counts, caches[rank], group.for_rank(rank), output)
            except BaseException:
                group.abort()
                raise

        futures = [self._pool.submit(run, r) for r in range(len(self.shards))]
        results = [f.result() for f in futures]
        owner = next((r for r, s in enumerate(self.shards) if s.spec.has_output), 0)
        return results[owner]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class LocalPipeline:
    """Stages in order; the first embeds token ids, the last produces logits."""

    def __init__(self, stages: list[LocalStage]) -> None:
        self.stages = stages

    @classmethod
    def from_file(cls, path: str | Path, plan: list[list[ShardSpec]], dtype: torch.dtype = torch.float32) -> "LocalPipeline":
        """plan[stage][tp_rank] = ShardSpec; each shard loads only its own tensors."""
        cfg = read_config(path)
        return cls([LocalStage([ModelShard(cfg, s, load_weights(path, cfg, s, dtype)) for s in stage]) for stage in plan])

    def new_cache(self, max_seq_len: int) -> list[list[KVCache]]:
        return [stage.new_cache(max_seq_len) for stage in self.stages]

    def forward(self, tokens: torch.Tensor, seq_ids: list[int], token_counts: list[int], caches: list[list[KVCache]], output: str = "logits") -> torch.Tensor:
        x = tokens
        for stage, cache in zip(self.stages, caches):
            x = stage.forward(x, seq_ids, token_counts, cache, output)
        return x

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


def split_evenly(n: int, weights: list[float]) -> list[tuple[int, int]]:
    """Half-open ranges covering [0, n) with sizes proportional to `weights` (largest remainder rounding)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    sizes = [int(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - sizes[i], reverse=True)[: n - sum(sizes)]:
        sizes[i] += 1
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def make_plan(
    cfg: ModelConfig,
    layer_ranges: list[tuple[int, int]],
    kv_ranges: list[tuple[int, int]] | None = None,
    ffn_ranges: list[tuple[int, int]] | None = None,
) -> list[list[ShardSpec]]:
    """plan[stage][rank]: pipeline stages over `layer_ranges`, each split the same way over TP ranks.

    Embedding on every rank of the first stage, output head on rank 0 of the last (ShardSpec's convention).
    """
    kv_ranges = kv_ranges or [(0, cfg.n_kv_heads)]
    ffn_ranges = ffn_ranges or [(0, cfg.ffn_size)]
    if len(kv_ranges) != len(ffn_ranges):
        raise ValueError(f"{len(kv_ranges)} KV ranges but {len(ffn_ranges)} FFN ranges: one of each per TP rank")
    last = len(layer_ranges) - 1
    return [
        [ShardSpec(layers, kv, ffn, st == 0, st == last and r == 0) for r, (kv, ffn) in enumerate(zip(kv_ranges, ffn_ranges))]
        for st, layers in enumerate(layer_ranges)
    ]
