"""The official `openai` client against the real server (tiny model)."""

from __future__ import annotations

import base64
import json
import math
import struct

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_completions(oai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Say hello"}]
    resp = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.system_fingerprint == "fp_ollama"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 10 and resp.usage.total_tokens == resp.usage.prompt_tokens + 10

    stream = oai.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_parts_and_json_mode(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="tiny", max_tokens=30, seed=1, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "JSON "}, {"type": "text", "text": "please"}]}])
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_completions(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 8
    streamed = list(oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == resp.choices[0].text
    assert streamed[-1].usage.total_tokens == resp.usage.total_tokens


def test_sse_framing(server) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "model": "tiny", "stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_models(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list().data]
    assert "tiny:latest" in ids and "smollm2:135m" in ids
    m = oai.models.retrieve("tiny:latest")
    assert m.id == "tiny:latest" and m.object == "model" and m.owned_by == "library" and m.created > 0
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_embeddings_float_and_base64(oai: openai.OpenAI) -> None:
    f = oai.embeddings.create(model="tiny", input=["hello world", "bye"], encoding_format="float")
    assert [d.index for d in f.data] == [0, 1] and len(f.data[0].embedding) == 96
    assert math.isclose(sum(v * v for v in f.data[0].embedding), 1.0, rel_tol=1e-6)
    # The client's default is base64 (little-endian float32), decoded back to floats by the client.
    b = oai.embeddings.create(model="tiny", input="hello world")
    assert b.data[0].embedding == pytest.approx(f.data[0].embedding, rel=1e-6, abs=1e-7)
    assert f.usage.prompt_tokens > 0
    d = oai.embeddings.create(model="tiny", input="hello world", dimensions=16, encoding_format="float")
    assert len(d.data[0].embedding) == 16


def test_embeddings_base64_bytes(server) -> None:
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": "hello world",
                                                        "encoding_format": "base64"}).json()
    raw = base64.b64decode(r["data"][0]["embedding"])
    vec = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(vec) == 96 and math.isclose(sum(v * v for v in vec), 1.0, rel_tol=1e-5)


def test_openai_errors(server, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        oai.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 404
    err = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []}).json()["error"]
    assert err == {"message": "[] is too short - 'messages'", "type": "invalid_request_error", "param": None,
                   "code": None}
    for body, needle in (
        ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, "num_predict"),
    ):
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": []})
    assert r.status_code == 400 and "invalid input" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": "x", "encoding_format": "int8"})
    assert r.status_code == 400
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"")
    assert r.status_code == 400 and r.json()["error"]["message"] == "missing request body"
