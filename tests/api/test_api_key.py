"""`serve --api-key KEY`: every endpoint but / and /api/version needs `Authorization: Bearer KEY`; without it a
401 in each API's error shape (streaming included); the official clients and our CLI pass the key."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import ollama
import openai
import pytest

from ollama_distributed.service.settings import ServerSettings

from .conftest import CLI, Server, start_server, stop_server

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("keyed"), ["--api-key", KEY])
    try:
        r = httpx.post(srv.url + "/api/create", headers=AUTH, timeout=120,
                       json={"model": "tiny", "from": str(tiny_gguf), "stream": False})
        assert r.status_code == 200, r.text
        yield srv
    finally:
        stop_server(srv)


def test_open_paths_and_401_shapes(keyed: Server) -> None:
    assert httpx.get(keyed.url + "/").status_code == 200
    assert httpx.get(keyed.url + "/api/version").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(keyed.url + "/api/tags", headers=headers)
        assert r.status_code == 401 and isinstance(r.json()["error"], str), r.text
        r = httpx.get(keyed.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    for path in ("/api/ps", "/metrics", "/api/distributed/status"):
        assert httpx.get(keyed.url + path).status_code == 401
        assert httpx.get(keyed.url + path, headers=AUTH).status_code == 200
    r = httpx.post(keyed.url + "/api/generate", json={"model": "tiny", "prompt": "x", "stream": True})
    assert r.status_code == 401 and "error" in r.json()


def test_ollama_client_with_and_without_key(keyed: Server) -> None:
    good = ollama.Client(host=keyed.url, headers=AUTH)
    assert good.generate(model="tiny", prompt="hi", options={"num_predict": 3}).done
    parts = list(good.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
                           options={"num_predict": 3}))
    assert parts[-1].done
    bad = ollama.Client(host=keyed.url)
    with pytest.raises(ollama.ResponseError) as exc:
        bad.generate(model="tiny", prompt="hi")
    assert exc.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as exc:
        list(bad.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert exc.value.status_code == 401


def test_openai_client_with_and_without_key(keyed: Server) -> None:
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    assert good.chat.completions.create(model="tiny", messages=msgs, max_tokens=3).choices[0].message.content
    assert list(good.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, stream=True))
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model="tiny", messages=msgs, max_tokens=3)
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        list(bad.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, stream=True))


def test_cli_sends_the_key_from_the_environment(keyed: Server) -> None:
    env = {k: v for k, v in keyed.env.items() if k not in ("OLLAMA_DISTRIBUTED_API_KEY", "OLLAMA_API_KEY")}
    ok = subprocess.run([*CLI, "list"], env={**env, "OLLAMA_DISTRIBUTED_API_KEY": KEY}, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "tiny" in ok.stdout, ok.stderr
    no = subprocess.run([*CLI, "list"], env=env, capture_output=True, text=True, timeout=120)
    assert no.returncode != 0 and "API key" in (no.stdout + no.stderr)
    run = subprocess.run([*CLI, "run", "tiny", "hi"], env={**env, "OLLAMA_DISTRIBUTED_API_KEY": KEY},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_key_from_the_environment_and_default_open() -> None:
    assert ServerSettings.from_env({"OLLAMA_DISTRIBUTED_API_KEY": "k1"}).api_key == "k1"
    assert ServerSettings.from_env({}).api_key is None and ServerSettings.from_env({}).host == "127.0.0.1"
    assert ServerSettings.from_env({"OLLAMA_DISTRIBUTED_API_KEY": "k1"}, api_key="k2").api_key == "k2"
    with pytest.raises(ValueError, match="API key"):
        ServerSettings(api_key="has space")
