"""create / copy / delete / blobs / pull against the real server, through the `ollama` client and raw httpx."""

from __future__ import annotations

import hashlib
import json

import httpx
import ollama
import pytest

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def show_raw(client: ollama.Client, name: str) -> dict:
    """/api/show as JSON (the ollama client's ShowResponse has no `system` field)."""
    r = httpx.post(client._client.base_url.join("/api/show"), json={"model": name})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url)


def test_create_from_uploaded_blob_copy_delete(client: ollama.Client, server, tiny_gguf) -> None:
    digest = client.create_blob(tiny_gguf)  # HEAD + POST /api/blobs/<digest>
    assert httpx.head(f"{server.url}/api/blobs/{digest}").status_code == 200
    statuses = [p.status for p in client.create(
        model="me/uploaded:v1", files={"tiny.gguf": digest}, system="You are terse.",
        parameters={"temperature": 0, "num_predict": 5, "stop": ["<|im_end|>"]}, stream=True)]
    assert statuses[-1] == "success" and "writing manifest" in statuses
    shown = client.show("me/uploaded:v1")
    assert show_raw(client, "me/uploaded:v1")["system"] == "You are terse."
    assert "temperature" in shown.parameters and "num_predict" in shown.parameters
    assert "PARAMETER num_predict 5" in shown.modelfile and "SYSTEM" in shown.modelfile
    out = client.generate(model="me/uploaded:v1", prompt="hi")
    assert out.eval_count <= 5  # the Modelfile's num_predict applies

    client.copy("me/uploaded:v1", "copied")
    names = [m.model for m in client.list().models]
    assert "me/uploaded:v1" in names and "copied:latest" in names
    assert show_raw(client, "COPIED")["system"] == "You are terse."  # lookups are case-insensitive
    assert client.delete("me/uploaded:v1").status == "success"
    with pytest.raises(ollama.ResponseError) as exc:
        client.show("me/uploaded:v1")
    assert exc.value.status_code == 404
    # The blob is still used by the copy, so it stays; deleting the copy prunes it.
    blob = server.models_dir / "blobs" / f"sha256-{digest.split(':')[1]}"
    assert blob.exists()
    client.delete("copied")
    assert not blob.exists() or any(  # still referenced by `tiny` (created from the same file)
        digest in p.read_text() for p in (server.models_dir / "manifests").rglob("*") if p.is_file())
    with pytest.raises(ollama.ResponseError) as exc:
        client.delete("copied")
    assert exc.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as exc:
        client.copy("nope", "other")
    assert exc.value.status_code == 404


def test_blob_upload_digest_mismatch(server) -> None:
    data = b"some bytes"
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    r = httpx.post(f"{server.url}/api/blobs/{wrong}", content=data)
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert httpx.head(f"{server.url}/api/blobs/{wrong}").status_code == 404
    right = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{server.url}/api/blobs/{right}", content=data).status_code == 201
    assert httpx.post(f"{server.url}/api/blobs/{right}", content=data).status_code == 200
    assert httpx.head(f"{server.url}/api/blobs/sha256:xyz").status_code == 400


def test_create_from_existing_model_with_modelfile_fields(client: ollama.Client) -> None:
    client.create(model="tiny-sys", from_="tiny", system="Answer in French.", template=None,
                  parameters={"temperature": 0})
    shown = client.show("tiny-sys")
    assert show_raw(client, "tiny-sys")["system"] == "Answer in French."
    assert shown.modelinfo["general.architecture"] == "llama"
    # Legacy `modelfile` text (Ollama < 0.5 clients).
    r = httpx.post(client._client.base_url.join("/api/create"), json={
        "model": "tiny-legacy", "stream": False,
        "modelfile": 'FROM tiny\nSYSTEM """Be kind."""\nPARAMETER top_k 5\nPARAMETER stop "<|im_end|>"\n'})
    assert r.json() == {"status": "success"}, r.text
    legacy = client.show("tiny-legacy")
    assert show_raw(client, "tiny-legacy")["system"] == "Be kind." and "top_k" in legacy.parameters
    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="x2", from_="tiny", parameters={"temperature": "warm"})
    assert exc.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="x3", from_="tiny", quantize="q4_K_M")
    assert exc.value.status_code == 400 and "quantize" in exc.value.error
    for name in ("tiny-sys", "tiny-legacy"):
        client.delete(name)


def test_tools_capability_and_parsing(client: ollama.Client, tiny_gguf_factory) -> None:
    path = tiny_gguf_factory(chat_template=TOOLS_TEMPLATE)
    client.create(model="tiny-tools", from_=str(path))
    assert "tools" in client.show("tiny-tools").capabilities
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}}, "required": ["city"]}}}
    with_tools = client.chat(model="tiny-tools", messages=[{"role": "user", "content": "Weather?"}], tools=[tool],
                             options={"num_predict": 3, "temperature": 0})
    without = client.chat(model="tiny-tools", messages=[{"role": "user", "content": "Weather?"}],
                          options={"num_predict": 3, "temperature": 0})
    # The tool definitions reached the prompt through the template.
    assert with_tools.prompt_eval_count > without.prompt_eval_count + 20
    # A tool-result turn renders too.
    follow = client.chat(model="tiny-tools", tools=[tool], options={"num_predict": 2}, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
    assert follow.done
    client.delete("tiny-tools")


def test_pull_imports_from_ollama_store(client: ollama.Client, server) -> None:
    # Listed read-only before the pull.
    assert any(m.model == "ollamatiny:latest" for m in client.list().models)
    progress = list(client.pull("ollamatiny", stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses
    assert any(p.total and p.completed == p.total for p in progress)
    assert (server.models_dir / "manifests" / "registry.ollama.ai" / "library" / "ollamatiny" / "latest").is_file()
    shown = client.show("ollamatiny")
    assert "temperature" in shown.parameters  # the params layer came along
    assert client.generate(model="ollamatiny", prompt="hi", options={"num_predict": 2}).done
    # Deleting our copy leaves the Ollama store untouched (and the model listed from there again).
    client.delete("ollamatiny")
    assert (server.ollama_dir / "manifests" / "registry.ollama.ai" / "library" / "ollamatiny" / "latest").is_file()
    assert any(m.model == "ollamatiny:latest" for m in client.list().models)
    r = httpx.request("DELETE", server.url + "/api/delete", json={"model": "ollamatiny"})
    assert r.status_code == 400 and "Ollama store" in r.json()["error"]


def test_pull_unknown_fails_fast(client: ollama.Client, server) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client.pull("llama3.2:1b")
    assert "cannot reach registry" in exc.value.error
    r = httpx.post(server.url + "/api/pull", json={"model": "llama3.2:1b", "stream": True}, timeout=10)
    assert r.status_code == 500 and "cannot reach registry" in r.json()["error"]
    r = httpx.post(server.url + "/api/push", json={"model": "tiny"})
    assert r.status_code == 500 and "registry" in r.json()["error"]


def test_distributed_status_in_process(server) -> None:
    ollama.Client(host=server.url).generate(model="tiny", prompt="x", options={"num_predict": 1})
    status = httpx.get(server.url + "/api/distributed/status").json()
    assert len(status["nodes"]) == 1
    node = status["nodes"][0]
    assert {"id", "address", "state", "resources", "measured"} <= set(node)
    model = next(m for m in status["models"] if m["name"] == "tiny:latest")
    (plan,) = model["plans"]
    assert plan["strategy"] == "single" and plan["stages"][0]["layers"] == [0, 4]
    (shard,) = plan["stages"][0]["shards"]
    assert shard["node_id"] == node["id"] and shard["pid"] == server.proc.pid
    assert json.dumps(plan)  # plain JSON
