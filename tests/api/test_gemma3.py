"""The real Gemma 3 270M (Q4_K_M, from PyPI) through the server: raw-prompt greedy text equals llama.cpp's on the
same file, chat renders its turn format and answers as llama.cpp does to the same text, /api/show reports it as Ollama does, and a 2-stage pipeline of it
on two Ray nodes gives the single node's text.

Reference: llama.cpp's answers, held below (llama-cpp-python 0.3.36, n_batch=1, greedy, on the same file), on
prompts where llama.cpp and transformers' float32 (loaded from the same file) agree on all 16 tokens; held so that
CI needs neither llama.cpp (a long source build) nor transformers' GGUF load (minutes on a loaded 2-core
machine). Where llama-cpp-python is installed, `test_held_references_are_llama_cpps` recomputes them. (Measured
once: our server's text equals transformers' float32 on 6 of 6 prompts, these 3 included.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import ollama
import pytest

from tests.helpers.gemma3_file import SKIP_REASON, gemma3_270m_path

from .conftest import serving

pytestmark = pytest.mark.slow
PROMPTS = ["def fibonacci(n):\n    if n < 2:", "The three primary colors are", "Water boils at"]
N = 16
LLAMA_CPP_TEXT = {
    "def fibonacci(n):\n    if n < 2:": "\n        return n\n    elif n == 1:\n        return ",
    "The three primary colors are": " red, blue, and yellow.\n\nThe primary colors are red, blue,",
    "Water boils at": " 100 degrees Celsius.\n\nWater boils at 100 degrees"
}
# question → (prompt tokens of the rendered turn, llama.cpp's greedy answer to that exact text)
LLAMA_CPP_CHAT = {
    "Count from one to ten.": (15, "The model is a 10-bit integer.\nThe model is a"),
    "Write a Python function that adds two numbers.": (18, "Write a Python function that adds two numbers. mendatang\nYou can use the following"),
}
LLAMA_CPP_IDS = {  # llama.cpp's token ids (add_bos, special tokens parsed) of Gemma's tricky strings
    "Über den Wolken — 雲の上で  spaces\tand tabs": [2, 107081, 2034, 27024, 3146, 2192, 236743, 240706, 65043, 237007, 138, 35220, 255968, 624, 42364],
    " leading space": [2, 5830, 2557],
    "1234567 + 89 = ?": [2, 236770, 236778, 236800, 236812, 236810, 236825, 236832, 900, 236743, 236828, 236819, 578, 2360],
    "emoji 😀👍 x": [2, 67906, 163543, 240493, 1123],
    "  two\n\n\nnewlines   ": [2, 138, 13498, 109, 208697, 139],
    "<start_of_turn>user\nhi<end_of_turn>\n": [2, 105, 2364, 107, 2202, 106, 107],
}


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    path = gemma3_270m_path()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="module")
def llama_cpp(gemma_file: Path):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (the reference for the real Gemma 3 file)")
    from llama_cpp import Llama

    # n_batch=1: one token per llama.cpp step (its batched prompt path crashed on this file here)
    return Llama(str(gemma_file), n_ctx=256, n_batch=1, n_threads=2, verbose=False)


@pytest.fixture(scope="module")
def gemma_server(tmp_path_factory, gemma_file: Path):
    with serving(tmp_path_factory.mktemp("gemma3"), gemma_file, name="gemma3") as srv:
        yield srv


def generate(url: str, prompt: str) -> ollama.GenerateResponse:
    return ollama.Client(host=url, timeout=600).generate(
        model="gemma3", prompt=prompt, raw=True, options={"temperature": 0, "num_predict": N})


def test_raw_greedy_text_equals_llama_cpp(gemma_server) -> None:
    for prompt in PROMPTS:
        out = generate(gemma_server.url, prompt)
        assert out.response == LLAMA_CPP_TEXT[prompt], gemma_server.log()[-3000:]
        assert out.eval_count == N


def test_tokenizer_matches_llama_cpp(gemma_file: Path) -> None:
    """Gemma's SentencePiece vocabulary (no space prefix, byte fallback, whitespace runs, control tokens)."""
    from ollama_distributed.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gemma_file)
    for text, want in LLAMA_CPP_IDS.items():
        ids = tok.encode(text)
        assert ids == want, text
        assert tok.decode(ids, skip_special=False).removeprefix("<bos>") == text


def test_chat_through_its_template(gemma_server) -> None:
    """/api/chat renders Gemma's turn format (the file ships no template: model/chat_template.py GEMMA_TEMPLATE)
    and answers what llama.cpp answers to that exact text. (This file is the pretrained 270M, not the
    instruction-tuned one, so its answers are continuations rather than replies; llama.cpp's are the same.)"""
    for question, (prompt_tokens, want) in LLAMA_CPP_CHAT.items():
        resp = ollama.Client(host=gemma_server.url, timeout=600).chat(
            model="gemma3", options={"temperature": 0, "num_predict": N},
            messages=[{"role": "user", "content": question}])
        assert resp.prompt_eval_count == prompt_tokens
        assert resp.message.content == want


def test_held_references_are_llama_cpps(gemma_file: Path, llama_cpp) -> None:
    """The held texts and ids are what llama.cpp gives on this file now (skips without llama-cpp-python)."""
    def complete(ids: list[int]) -> str:
        llama_cpp.reset()
        return llama_cpp.create_completion(ids, max_tokens=N, temperature=0.0, top_k=1)["choices"][0]["text"]

    for prompt, want in LLAMA_CPP_TEXT.items():
        assert complete(llama_cpp.tokenize(prompt.encode(), add_bos=True, special=True)) == want
    for question, (prompt_tokens, want) in LLAMA_CPP_CHAT.items():
        text = f"<bos><start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"
        ids = llama_cpp.tokenize(text.encode(), add_bos=False, special=True)
        assert (len(ids), complete(ids)) == (prompt_tokens, want)
    for text, want in LLAMA_CPP_IDS.items():
        assert llama_cpp.tokenize(text.encode(), add_bos=True, special=True) == want


def test_show_reports_family_size_and_quantisation(gemma_server) -> None:
    show = httpx.post(gemma_server.url + "/api/show", json={"model": "gemma3"}, timeout=60).json()
    details = show["details"]
    assert details["family"] == "gemma3" and details["families"] == ["gemma3"]
    assert details["format"] == "gguf" and details["quantization_level"] == "Q4_K_M"
    assert details["parameter_size"] == "268.10M"  # Ollama's gemma3:270m shows 268.10M
    info = show["model_info"]
    assert info["general.architecture"] == "gemma3" and info["general.parameter_count"] == 268098176
    assert info["gemma3.attention.sliding_window"] == 512


def test_two_stage_pipeline_equals_one_node(tmp_path_factory, gemma_server, gemma_file: Path) -> None:
    """235 MiB per node cannot hold the 253 MB file, so the planner splits it into two stages (each holding the
    178 MB Q8_0 embedding: the first to embed, the last as the tied head)."""
    single = {p: generate(gemma_server.url, p).response for p in PROMPTS}
    with serving(tmp_path_factory.mktemp("gemma3-pp"), gemma_file, name="gemma3", timeout=300,
                 extra_args=["--local-nodes", "2", "--strategy", "pipeline", "--node-memory", "235MiB"]) as srv:
        for prompt in PROMPTS:
            assert generate(srv.url, prompt).response == single[prompt], srv.log()[-3000:]
        status = httpx.get(srv.url + "/api/distributed/status", timeout=120).json()
        plan = next(m for m in status["models"] if m["name"] == "gemma3:latest")["plans"][0]
        assert plan["strategy"] == "pipeline" and len(plan["stages"]) == 2, plan
