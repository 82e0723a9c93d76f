"""An `Executor` that holds the whole model in this process (one `ModelShard`, one KV cache).

Used by `ollama-distributed run` without a cluster, by tests as the reference the distributed executors must
match, and as the single-node fast path.

`LocalExecutor.from_shards` also runs a model split into pipeline stages × tensor-parallel shards inside this
process (chaining stages, summing TP partials) — the same split the Ray executor places on nodes, so a plan can
be checked for equality here before it is deployed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..model.config import ModelConfig
from ..model.errors import ContextLengthError
from ..model.tp_local import LocalPipeline, LocalStage
from ..model.formats import weight_format_name
from ..model.quant import kv_cache_dtype
from ..model.shard import ShardSpec
from ..model.transformer import ModelShard
from ..model.weights import drop_file_pages, load_weights, read_config
from .executor import CacheFullError

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 8192


def kv_dtype(dtype: torch.dtype, quant: str | None, kv_cache_type: str | None) -> torch.dtype:
    return kv_cache_dtype(weight_format_name(str(dtype), quant), kv_cache_type)


class LocalExecutor:
    """In-process executor over one or more ModelShards.

    path: GGUF file or HF directory. dtype: compute dtype of the weights and cache.
    max_seq_len: most tokens per sequence (KV cache bound); default min(model context, 8192). The cache grows on
    demand, so a large bound costs nothing until used.
    quant: "native" keeps every tensor in the file's own type (`--dtype auto`), "int4" runs the layers on 4-bit
    groups (model/quant.py; dtype is then unused). kv_cache_type: "f32" | "f16" (None: the shard's default).
    """

    def __init__(
        self,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        max_seq_len: int | None = None,
        quant: str | None = None,
        kv_cache_type: str | None = None,
    ) -> None:
        shard = ModelShard.from_file(path, None, dtype, quant, kv_dtype(dtype, quant, kv_cache_type))
        self._init([[shard]], max_seq_len)
        self.path = Path(path)

    @classmethod
    def from_plan(
        cls, path: str | Path, plan: list[list[ShardSpec]], dtype: torch.dtype = torch.float32, max_seq_len: int | None = None,
        quant: str | None = None, kv_cache_type: str | None = None,
    ) -> "LocalExecutor":
        """Load `plan[stage][tp_rank]` shards from one file (each reads only its tensors) and run them in-process."""
        cfg = read_config(path)
        kv = kv_dtype(dtype, quant, kv_cache_type)
        stages = [[ModelShard(cfg, spec, load_weights(path, cfg, spec, dtype, quant), quant, kv) for spec in stage]
                  for stage in plan]
        drop_file_pages(path)
        self = cls.from_shards(stages, max_seq_len)
        self.path = Path(path)
        return self

    @classmethod
    def from_shards(cls, stages: Sequence[Sequence[ModelShard]], max_seq_len: int | None = None) -> "LocalExecutor":
        """An executor over `stages[s][t]`: pipeline stage s, tensor-parallel shard t, all in this process.

        Stage s+1 takes stage s's hidden states; within a stage the row-parallel partial sums are added (the
        all-reduce of a real TP group), and the logits come from the stage-final shard that has the output head.
        """
        self = cls.__new__(cls)
        self._init([list(stage) for stage in stages], max_seq_len)
        self.path: Path | None = None
        return self

    def _init(self, stages: list[list[ModelShard]], max_seq_len: int | None) -> None:
        if not stages or any(not stage for stage in stages):
            raise ValueError("need at least one stage with at least one shard")
        self.stages = stages
        single = len(stages) == 1 and len(stages[0]) == 1
        self._pipeline = None if single else LocalPipeline([LocalStage(stage) for stage in stages])
        self.config: ModelConfig = stages[0][0].cfg
        limit = self.config.context_length
        self.max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN) if max_seq_len is None else int(max_seq_len)
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.caches = [[shard.new_cache(self.max_seq_len) for shard in stage] for stage in stages]
        self._lengths: dict[int, int] = {}
        self._closed = False

    @property
    def shard(self) -> ModelShard:
        """The single shard (whole model) of a plain LocalExecutor."""
        return self.stages[0][0]

    # ---- Executor protocol ----------------------------------------------------------------------------------------

    def step(self, seq_ids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        self._check_open()
        if len(seq_ids) != len(tokens):
            raise ValueError(f"step: {len(seq_ids)} seq_ids but {len(tokens)} token lists")
        counts = [len(t) for t in tokens]
        for sid, n in zip(seq_ids, counts):
            have = self._lengths.get(sid, 0)
            if have + n > self.max_seq_len:
                raise CacheFullError(
                    f"sequence {sid}: {have} cached + {n} new tokens exceeds max_seq_len {self.max_seq_len}"
                )
        x = torch.tensor([t for ts in tokens for t in ts], dtype=torch.int64)
        try:
            logits = self._forward(x, seq_ids, counts, self.caches, "logits")
        except ContextLengthError as exc:
            raise CacheFullError(str(exc)) from exc
        for sid, n in zip(seq_ids, counts):
            self._lengths[sid] = self._lengths.get(sid, 0) + n
        return logits

    def embed(self, tokens: list[int]) -> torch.Tensor:
        self._check_open()
        if not tokens:
            raise ValueError("embed: no tokens")
        if len(tokens) > self.max_seq_len:
            raise CacheFullError(f"embed: {len(tokens)} tokens exceed max_seq_len {self.max_seq_len}")
        # A throwaway cache: embeddings must not disturb (or be limited by) the running sequences.
        caches = [[shard.new_cache(len(tokens)) for shard in stage] for stage in self.stages]
        x = torch.tensor(tokens, dtype=torch.int64)
        hidden = self._forward(x, [0], [len(tokens)], caches, "hidden")
        return hidden.mean(dim=0)

    def free(self, seq_id: int) -> None:
        self._lengths.pop(seq_id, None)
        for stage in self.caches:
            for cache in stage:
                cache.free(seq_id)

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
        self._closed = True
        self.caches = []
        self.stages = []
        self._lengths.clear()

    # ---- introspection (tests, /api/ps) ---------------------------------------------------------------------------

    def cached_sequences(self) -> set[int]:
        """Sequence ids that hold KV cache in any shard."""
        return {sid for stage in self.caches for cache in stage for sid in cache.seq_ids()}

    def cached_length(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)

    def cache_bytes(self) -> int:
        return sum(cache.nbytes() for stage in self.caches for cache in stage)

    # ---- internals ------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the executor is closed")

    def _forward(self, x: torch.Tensor, seq_ids: list[int], counts: list[int], caches, output: str) -> torch.Tensor:
        if self._pipeline is None:
            return self.stages[0][0].forward(x, seq_ids, counts, caches[0][0], output=output)
        # Stages × TP shards in one process: model/tp_local.py runs a stage's shards in threads that meet in a
        # barrier-based all-reduce, and chains stages by hidden states.
        return self._pipeline.forward(x, seq_ids, counts, caches, output)
