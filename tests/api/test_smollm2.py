"""The bundled SmolLM2-135M-Instruct through the server: real answers, and the server's tokens equal the
in-process engine's for the same prompt (tiny model for the equivalence, to keep CPU time low)."""

from __future__ import annotations

from pathlib import Path

import ollama
import openai
import pytest

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.runtime.engine import InferenceEngine
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.requests import GenerationRequest


@pytest.mark.slow
def test_smollm2_answers(server) -> None:
    client = ollama.Client(host=server.url)
    resp = client.chat(model="smollm2:135m", options={"temperature": 0, "num_predict": 24},
                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in resp.message.content, resp.message.content
    assert resp.done_reason in ("stop", "length")
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "Name a primary colour."}]
    whole = oai.chat.completions.create(model="smollm2:135m", messages=msgs, temperature=0, max_tokens=16)
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="smollm2:135m", messages=msgs, temperature=0, max_tokens=16, stream=True) if c.choices)
    assert streamed == whole.choices[0].message.content and streamed.strip()


def test_server_tokens_equal_in_process_engine(server, tiny_gguf: Path) -> None:
    prompt = "The quick brown fox"
    via_server = ollama.Client(host=server.url).generate(
        model="tiny", prompt=prompt, raw=True, options={"temperature": 0, "num_predict": 24})
    tok = Tokenizer.from_gguf(tiny_gguf)
    with InferenceEngine(LocalExecutor(tiny_gguf, quant="native"), tok) as engine:  # the server's default format (--dtype auto)
        ids = tok.encode(prompt)
        local = engine.generate(GenerationRequest(prompt_ids=ids, options=GenerationOptions(temperature=0,
                                                                                          num_predict=24)))
    assert via_server.response == local.text
    assert via_server.prompt_eval_count == len(ids) and via_server.eval_count == len(local.token_ids)
