"""Partitioning strategies, one per module, all satisfying `PartitionStrategy` (base.py)."""

from .base import PartitionStrategy, Worker
from .hybrid import HybridStrategy
from .pipeline import PipelineStrategy
from .single import SingleStrategy
from .tensor import TensorStrategy


def builtin_strategies() -> dict[str, PartitionStrategy]:
    """A fresh instance of every built-in strategy, by name."""
    return {s.name: s for s in (SingleStrategy(), PipelineStrategy(), TensorStrategy(), HybridStrategy())}


__all__ = ["PartitionStrategy", "Worker", "SingleStrategy", "PipelineStrategy", "TensorStrategy", "HybridStrategy",
           "builtin_strategies"]
