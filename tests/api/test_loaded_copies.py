"""One loaded copy per model name: a pull or create that changes what a name points to replaces the loaded
copy, so /api/ps lists the name once and keep_alive 0 unloads it (before: the old copy stayed, listed twice)."""

from __future__ import annotations

import httpx
import ollama

from .conftest import create_model, write_ollama_store


def _ps(client: ollama.Client, name: str) -> list:
    return [m for m in client.ps().models if m.model == name]


def test_pull_of_a_loaded_model_leaves_one_copy(server, tiny_gguf_factory) -> None:
    client = ollama.Client(host=server.url)
    # weights of its own, so no other loaded name shares the blob the pull creates
    write_ollama_store(server.ollama_dir, tiny_gguf_factory(seed=21),
                       ("registry.ollama.ai", "library", "pulltiny", "latest"))
    first = client.generate(model="pulltiny", prompt="hi", options={"num_predict": 2, "temperature": 0})
    assert len(_ps(client, "pulltiny:latest")) == 1  # loaded from the Ollama store's blob
    assert list(client.pull("pulltiny", stream=True))[-1].status == "success"  # now our store's own blob
    again = client.generate(model="pulltiny", prompt="hi", options={"num_predict": 2, "temperature": 0})
    assert again.response == first.response
    listed = _ps(client, "pulltiny:latest")
    assert len(listed) == 1, [m.model for m in client.ps().models]
    entry = next(m for m in client.list().models if m.model == "pulltiny:latest")
    assert listed[0].digest == entry.digest
    client.generate(model="pulltiny", prompt="", keep_alive=0)
    assert _ps(client, "pulltiny:latest") == []
    client.delete("pulltiny")


def test_create_repointing_a_loaded_name_replaces_it(server, tiny_gguf_factory) -> None:
    client = ollama.Client(host=server.url)
    create_model(server.url, "swapped", tiny_gguf_factory(seed=11))
    client.generate(model="swapped", prompt="hi", options={"num_predict": 2})
    old = _ps(client, "swapped:latest")
    assert len(old) == 1
    create_model(server.url, "swapped", tiny_gguf_factory(seed=12))
    # replaced as soon as the create finished (the old copy was idle): nothing listed until the next use
    assert _ps(client, "swapped:latest") == []
    client.generate(model="swapped", prompt="hi", options={"num_predict": 2})
    new = _ps(client, "swapped:latest")
    assert len(new) == 1 and new[0].digest != old[0].digest
    status = httpx.get(server.url + "/api/distributed/status").json()
    assert sum(1 for m in status.get("models", []) if m.get("name") == "swapped:latest") <= 1
    client.generate(model="swapped", prompt="", keep_alive=0)
    assert _ps(client, "swapped:latest") == []
    client.delete("swapped")
