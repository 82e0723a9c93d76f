"""Ollama model names (checklist §14)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from ollama_distributed.service.names import InvalidModelNameError, ModelName


@pytest.mark.parametrize("raw, parts, display", [
    ("llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest"), "llama3.2:latest"),
    ("llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b"), "llama3.2:1b"),
    ("user/m:tag", ("registry.ollama.ai", "user", "m", "tag"), "user/m:tag"),
    ("hf.co/u/r:Q4_K_M", ("hf.co", "u", "r", "Q4_K_M"), "hf.co/u/r:Q4_K_M"),
    ("localhost:5000/ns/m", ("localhost:5000", "ns", "m", "latest"), "localhost:5000/ns/m:latest"),
    ("registry.ollama.ai/library/x:y", ("registry.ollama.ai", "library", "x", "y"), "x:y"),
    ("m@sha256:" + "a" * 64, ("registry.ollama.ai", "library", "m", "latest"), "m:latest"),
    ("_under.score-ok", ("registry.ollama.ai", "library", "_under.score-ok", "latest"), "_under.score-ok:latest"),
])
def test_parse(raw: str, parts: tuple, display: str) -> None:
    name = ModelName.parse(raw)
    assert name.parts == parts and name.display == display


@pytest.mark.parametrize("raw", [
    "", "  ", "../x", "a/../b", "/abs", "a/b/c/d", "x:", ":tag", "bad name", "x:..", "-x", ".x", "a" * 81,
    "m:" + "t" * 81, "ns.dot/m", "ns/m:ta/g", "m:t:a", "é", "a\\b", "x\x00y", "h" * 351 + "/n/m",
])
def test_invalid(raw: str) -> None:
    with pytest.raises(InvalidModelNameError):
        ModelName.parse(raw)


def test_case_insensitive_key() -> None:
    assert ModelName.parse("Llama3:Latest").key() == ModelName.parse("llama3").key()


_part = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)
_ns = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,20}", fullmatch=True)


@given(ns=_ns, model=_part, tag=_part)
def test_roundtrip_and_safe_paths(ns: str, model: str, tag: str) -> None:
    name = ModelName.parse(f"{ns}/{model}:{tag}")
    assert ModelName.parse(name.display) == name
    # Every part is a single safe path component.
    for p in name.parts:
        assert "/" not in p and p not in (".", "..") and not p.startswith(".")
