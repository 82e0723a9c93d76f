"""Ollama Distributed: one LLM across a cluster of machines, behind the Ollama API."""

import os
import sys

__version__ = "0.1.0"

# OpenMP threads that spin while waiting (GNU OpenMP's default: spin ~300k iterations, then sleep) starve every
# other process when shards, Ray workers and the server share a few cores: a 16-step SmolLM2 decode took 34 s with
# spinning and 1.3 s with PASSIVE on a loaded 2-core machine. libgomp reads this once, when torch loads it, so it
# is set here, before any of our modules imports torch (and inherited by Ray workers); an explicit user setting wins.
_OMP_POLICY_FROM_USER = "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def use_spinning_openmp() -> bool:
    """For a process that runs the whole model alone (`run` or `serve` without a cluster): restore libgomp's default
    brief spinning, unless the user chose a policy or torch is already loaded. A decode step opens ~150 parallel
    regions, and waking a sleeping thread for each cost 2x on int4 decode here (22.6 vs 10.8 ms per token,
    bench/README.md section 5). Returns whether the policy changed."""
    if _OMP_POLICY_FROM_USER or "torch" in sys.modules:
        return False
    os.environ.pop("OMP_WAIT_POLICY", None)
    return True
