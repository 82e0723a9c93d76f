"""The official `ollama` Python client against the real server process (tiny model unless noted)."""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import ollama
import pytest

GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url)


def test_root_version_head(server) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert r.headers["content-type"].startswith("text/plain")
    assert httpx.head(server.url + "/").status_code == 200
    version = httpx.get(server.url + "/api/version").json()["version"]
    assert all(part.isdigit() for part in version.split("."))
    assert httpx.head(server.url + "/api/version").status_code == 200


def test_list_and_show(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert "tiny:latest" in names
    assert "smollm2:135m" in names  # bundled
    assert "ollamatiny:latest" in names  # read-only from the Ollama store
    tiny = next(m for m in client.list().models if m.model == "tiny:latest")
    assert tiny.details.family == "llama" and tiny.details.quantization_level == "F32"
    assert tiny.size > 0 and len(tiny.digest) == 64

    info = client.show("tiny")
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.block_count"] == 4
    assert "general.name" not in info.modelinfo and "tokenizer.chat_template" not in info.modelinfo
    assert info.modelinfo["tokenizer.ggml.tokens"] == []  # token arrays only when verbose
    assert info.capabilities == ["completion"]
    assert info.template and "im_start" in info.template
    verbose = httpx.post(client._client.base_url.join("/api/show"), json={"model": "tiny", "verbose": True}).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 49152
    assert any(t["name"] == "token_embd.weight" for t in verbose["tensors"])


def test_show_unknown_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client.show("does-not-exist")
    assert exc.value.status_code == 404
    assert "model 'does-not-exist' not found" in exc.value.error


def test_generate_stream_equals_nonstream(client: ollama.Client) -> None:
    whole = client.generate(model="tiny", prompt="Why is the sky blue?", options=GREEDY)
    assert whole.done and whole.done_reason == "length"
    assert whole.eval_count == 12 and whole.prompt_eval_count > 5
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(whole, field), int)
    assert whole.total_duration >= whole.eval_duration > 0
    assert len(whole.context) == whole.prompt_eval_count + whole.eval_count

    chunks = list(client.generate(model="tiny", prompt="Why is the sky blue?", options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert chunks[-1].response == "" and chunks[-1].eval_count == 12
    assert "".join(c.response for c in chunks) == whole.response  # greedy: same tokens either way
    assert chunks[-1].context == whole.context


def test_generate_context_continues(client: ollama.Client) -> None:
    first = client.generate(model="tiny", prompt="Hello", options=GREEDY)
    second = client.generate(model="tiny", prompt="And then?", context=first.context, options=GREEDY)
    assert second.prompt_eval_count > len(first.context)


def test_raw_generate_has_no_context(server) -> None:
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "abc", "raw": True,
                                                       "stream": False, "options": GREEDY})
    assert r.status_code == 200 and "context" not in r.json()
    assert r.json()["prompt_eval_count"] == 1 or r.json()["prompt_eval_count"] <= 3
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x", "raw": True, "system": "s"})
    assert r.status_code == 400


def test_chat_stream_and_not(client: ollama.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    resp = client.chat(model="tiny", messages=messages, options=GREEDY)
    assert resp.message.role == "assistant" and resp.message.content
    assert resp.done_reason == "length" and resp.eval_count == 12
    parts = list(client.chat(model="tiny", messages=messages, options=GREEDY, stream=True))
    assert all(p.message.role == "assistant" for p in parts)
    assert "".join(p.message.content for p in parts) == resp.message.content
    assert parts[-1].done and parts[-1].prompt_eval_count == resp.prompt_eval_count
    # Extra fields and `images: []` are tolerated (LangChain sends them).
    r = httpx.post(client._client.base_url.join("/api/chat"), json={
        "model": "tiny", "stream": False, "options": GREEDY, "unknown_field": 1,
        "messages": [{"role": "USER", "content": "Hi there", "images": [], "extra": True}]})
    assert r.status_code == 200 and r.json()["message"]["content"]


def test_embed(client: ollama.Client, server) -> None:
    out = client.embed(model="tiny", input=["hello world", "goodbye"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 96
    for vec in out.embeddings:
        assert math.isclose(sum(v * v for v in vec), 1.0, rel_tol=1e-6)
    assert out.embeddings[0] != out.embeddings[1]
    short = client.embed(model="tiny", input="hello world", dimensions=8)
    assert len(short.embeddings[0]) == 8 and math.isclose(sum(v * v for v in short.embeddings[0]), 1.0, rel_tol=1e-6)
    assert client.embed(model="tiny", input=[]).embeddings == []
    legacy = httpx.post(server.url + "/api/embeddings", json={"model": "tiny", "prompt": "hello world"}).json()
    norm = math.sqrt(sum(v * v for v in legacy["embedding"]))
    assert norm > 0 and not math.isclose(norm, 1.0, rel_tol=1e-3)  # legacy endpoint: not normalised
    assert [v / norm for v in legacy["embedding"]] == pytest.approx(out.embeddings[0], rel=1e-5, abs=1e-7)
    assert httpx.post(server.url + "/api/embeddings", json={"model": "tiny", "prompt": ""}).json() == {"embedding": []}
    r = httpx.post(server.url + "/api/embed", json={"model": "tiny", "input": 5})
    assert r.status_code == 400 and "invalid input type" in r.json()["error"]


def test_ps_keep_alive_load_unload(client: ollama.Client, server) -> None:
    client.generate(model="tiny", prompt="x", options={"num_predict": 1})
    ps = client.ps().models
    tiny = next(m for m in ps if m.model == "tiny:latest")
    assert tiny.context_length > 0 and tiny.expires_at is not None
    raw = httpx.get(server.url + "/api/ps").json()["models"]
    entry = next(m for m in raw if m["name"] == "tiny:latest")
    assert entry["placement"]["strategy"] == "single" and entry["engine"]["kv_sequences"] == 0

    # Empty prompt loads; keep_alive 0 unloads (Open WebUI's unload).
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "keep_alive": 0}).json()
    assert r["done"] and r["done_reason"] == "unload"
    assert all(m["name"] != "tiny:latest" for m in httpx.get(server.url + "/api/ps").json()["models"])
    r = httpx.post(server.url + "/api/chat", json={"model": "tiny", "messages": []}).json()
    assert r["done_reason"] == "load" and r["message"]["role"] == "assistant"
    assert any(m["name"] == "tiny:latest" for m in httpx.get(server.url + "/api/ps").json()["models"])
    # A short keep_alive expires on its own.
    client.generate(model="tiny", prompt="x", options={"num_predict": 1}, keep_alive="1s")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(m.model == "tiny:latest" for m in client.ps().models):
        time.sleep(0.2)
    assert all(m.model != "tiny:latest" for m in client.ps().models)


def test_format_json_is_valid(client: ollama.Client) -> None:
    for fmt, n in (("json", 40), ({"type": "object", "properties": {"a": {"type": "string"}}}, 25), ("json", 6)):
        resp = client.generate(model="tiny", prompt="Reply in JSON", format=fmt,
                               options={"num_predict": n, "temperature": 1.0, "seed": 7})
        assert isinstance(json.loads(resp.response), dict), resp.response
    chat = client.chat(model="tiny", messages=[{"role": "user", "content": "JSON please"}], format="json",
                       options={"num_predict": 30, "seed": 3})
    assert isinstance(json.loads(chat.message.content), dict)


def test_tools_rejected_without_template_support(client: ollama.Client) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                             "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert exc.value.status_code == 400 and "does not support tools" in exc.value.error


def test_sixteen_concurrent_streams(server) -> None:
    results: dict[int, tuple[str, str]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = ollama.Client(host=server.url)
            text, reason = "", ""
            for part in c.generate(model="tiny", prompt=f"Story number {i}", stream=True,
                                   options={"temperature": 0, "num_predict": 16}):
                text += part.response
                if part.done:
                    reason = part.done_reason
            results[i] = (text, reason)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 16 and all(reason == "length" for _, reason in results.values())
    # Batched decoding gives each request what it gets alone (greedy).
    alone = ollama.Client(host=server.url).generate(model="tiny", prompt="Story number 3",
                                                    options={"temperature": 0, "num_predict": 16})
    assert results[3][0] == alone.response


def test_request_template_and_system(server) -> None:
    def gen(**extra) -> dict:
        r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "abc", "stream": False,
                                                           "options": {"num_predict": 1}, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    raw = gen(raw=True)["prompt_eval_count"]
    assert gen(template="{{ .Prompt }}")["prompt_eval_count"] == raw  # Go-template override: the bare prompt
    with_system = gen(template="{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}", system="be brief")
    assert with_system["prompt_eval_count"] > raw
    templated = gen()["prompt_eval_count"]  # the GGUF chat template adds its role markers
    assert templated > raw
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x",
                                                       "template": "{{ range .Messages }}{{ end }}"})
    assert r.status_code == 400 and "template" in r.json()["error"]
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and "insert" in r.json()["error"]
