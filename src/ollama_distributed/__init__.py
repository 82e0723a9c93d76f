"""Ollama Distributed: one LLM across a cluster of machines, behind the Ollama API."""

import os
import sys

__version__ = "0.1.0"

# OpenMP threads that spin while waiting (GNU OpenMP's default "ACTIVE" policy) starve every other process when
# shards, Ray workers and the server share a few cores: a 16-step SmolLM2 decode took 34 s with spinning and 1.3 s
# with PASSIVE on a loaded 2-core machine. libgomp reads this once, when torch loads it, so it is set here, before
# any of our modules imports torch (and inherited by Ray workers); an explicit user setting wins. Where torch (so
# libgomp) was loaded first, the setting would not apply, and it is left unset so that it still tells the truth:
# our CPU kernels read it to choose their threading (model/kernels/cpu_kernels.cpp, openmp_sleeps).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
