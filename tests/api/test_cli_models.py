"""`ollama-distributed list|ps|show|create|cp|rm|pull` as a user runs them, against the real server at OLLAMA_HOST;
plus `run_via_server` (used by `ollama-distributed run` when a server answers)."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from ollama_distributed.service.client import ServerError, resolve_host, run_via_server

from .conftest import CLI, free_port


def cli(server, *args: str, host: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OLLAMA_HOST=host or server.host, COLUMNS="200")
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)


def test_list_show_ps(server) -> None:
    r = cli(server, "list")
    assert r.returncode == 0, r.stderr
    assert "NAME" in r.stdout and "tiny:latest" in r.stdout and "smollm2:135m" in r.stdout
    r = cli(server, "show", "tiny")
    assert r.returncode == 0 and "llama" in r.stdout and "completion" in r.stdout
    r = cli(server, "show", "tiny", "--template")
    assert "im_start" in r.stdout
    r = cli(server, "ps")
    assert r.returncode == 0 and "PLACEMENT" in r.stdout


def test_create_cp_rm(server, tiny_gguf, tmp_path) -> None:
    r = cli(server, "create", "cli-tiny", "--from", str(tiny_gguf))
    assert r.returncode == 0, r.stderr
    assert "success" in r.stderr
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f'FROM {tiny_gguf.name}\nSYSTEM """Short answers."""\nPARAMETER temperature 0\n')
    (tmp_path / tiny_gguf.name).symlink_to(tiny_gguf)  # FROM is relative to the Modelfile
    r = cli(server, "create", "cli-mf", "-f", str(modelfile))
    assert r.returncode == 0, r.stderr
    r = cli(server, "show", "cli-mf", "--system")
    assert r.stdout.strip() == "Short answers."
    assert cli(server, "cp", "cli-tiny", "cli-copy").returncode == 0
    r = cli(server, "rm", "cli-tiny", "cli-copy", "cli-mf")
    assert r.returncode == 0 and r.stdout.count("deleted") == 3
    assert "cli-copy" not in cli(server, "list").stdout


def test_errors_are_one_line(server, tmp_path) -> None:
    r = cli(server, "show", "nope")
    assert r.returncode == 1 and r.stderr.strip() == "Error: model 'nope' not found"
    r = cli(server, "rm", "nope")
    assert r.returncode == 1 and r.stderr.startswith("Error: ")
    r = cli(server, "pull", "llama3.2")
    assert r.returncode == 1 and "cannot reach registry" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" * 100)
    r = cli(server, "create", "bad", "--from", str(bad))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr
    r = cli(server, "list", host=f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "could not connect" in r.stderr


def test_resolve_host() -> None:
    assert resolve_host("example.com") == "http://example.com:11434"
    assert resolve_host("http://example.com") == "http://example.com:80"
    assert resolve_host("https://example.com") == "https://example.com:443"
    assert resolve_host("1.2.3.4:99") == "http://1.2.3.4:99"
    assert resolve_host("0.0.0.0") == "http://127.0.0.1:11434"
    assert resolve_host("https://h:8443/proxy/") == "https://h:8443/proxy"


def test_run_via_server(server) -> None:
    out = io.StringIO()
    assert run_via_server(server.host, "tiny", "Hello", options={"num_predict": 5, "temperature": 0}, out=out)
    assert len(out.getvalue().strip()) > 0
    # Interactive chat: two turns, then EOF.
    lines = iter(["Hi", "More"])

    def fake_input(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert run_via_server(server.host, "tiny", None, options={"num_predict": 3}, out=out, input_fn=fake_input)
    assert out.getvalue().count("\n\n") >= 2
    with pytest.raises(ServerError) as exc:
        run_via_server(server.host, "nope", "x", out=io.StringIO())
    assert "not found" in str(exc.value)
    assert run_via_server(f"127.0.0.1:{free_port()}", "tiny", "x", out=io.StringIO()) is False


def test_run_command_goes_through_the_server(server) -> None:
    """`ollama-distributed run` streams from the server at OLLAMA_HOST when one answers: its text equals the
    server's own greedy /api/generate answer for the same prompt."""
    import httpx

    body = {"model": "tiny", "prompt": "Hello there", "stream": False,
            "options": {"temperature": 0, "num_predict": 12}}
    expected = httpx.post(f"{server.url}/api/generate", json=body, timeout=300).json()["response"]
    r = cli(server, "run", "tiny", "Hello there", "--temperature", "0", "--num-predict", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expected
    # An unknown model is the server's 404, reported as one line.
    r = cli(server, "run", "no-such-model", "hi")
    assert r.returncode == 1 and "not found" in r.stderr
