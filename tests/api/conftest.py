"""A real server process on a free 127.0.0.1 port, shared by the API tests of a session.

The server is started exactly as a user starts it (`ollama-distributed serve --port N`), with its stores in a
temp directory: OLLAMA_DISTRIBUTED_MODELS (ours, writable) and OLLAMA_MODELS (a fake "existing Ollama store"
holding one model in Ollama's layout, for /api/pull and read-only listing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

CLI = [sys.executable, "-c", "from ollama_distributed.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    host: str  # host:port, as OLLAMA_HOST
    proc: subprocess.Popen
    models_dir: Path
    ollama_dir: Path
    log_path: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_ollama_store(root: Path, gguf: Path, name: tuple[str, str, str, str]) -> str:
    """Put `gguf` into an Ollama-layout store under `name` (host, namespace, model, tag); returns the digest."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    shutil.copyfile(gguf, blobs / f"sha256-{digest}")
    config = json.dumps({"model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
                         "model_type": "9.7M", "file_type": "F32"}).encode()
    cdig = hashlib.sha256(config).hexdigest()
    (blobs / f"sha256-{cdig}").write_bytes(config)
    params = json.dumps({"temperature": 0, "stop": ["<|im_end|>"]}).encode()
    pdig = hashlib.sha256(params).hexdigest()
    (blobs / f"sha256-{pdig}").write_bytes(params)
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": f"sha256:{cdig}",
                   "size": len(config)},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)},
            {"mediaType": "application/vnd.ollama.image.params", "digest": f"sha256:{pdig}", "size": len(params)},
        ],
    }
    path = root.joinpath("manifests", *name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return digest


def start_server(tmp: Path, extra_args: list[str] = (), extra_env: dict[str, str] | None = None,
                 timeout: float = 180.0) -> Server:
    port = free_port()
    models_dir, ollama_dir = tmp / "od-models", tmp / "ollama-models"
    models_dir.mkdir(parents=True, exist_ok=True)
    ollama_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "OLLAMA_DISTRIBUTED_MODELS": str(models_dir),
        "OLLAMA_MODELS": str(ollama_dir),
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_NUM_PARALLEL": "4",
        "OLLAMA_MAX_QUEUE": "16",
        "OLLAMA_KEEP_ALIVE": "5m",
    })
    env.update(extra_env or {})
    log_path = tmp / f"server-{port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), *extra_args], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    server = Server(url, f"127.0.0.1:{port}", proc, models_dir, ollama_dir, log_path, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(url + "/", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer within {timeout} s:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)


def create_model(url: str, name: str, path: Path) -> None:
    """`/api/create` NAME from a GGUF path, as a user would (non-streaming)."""
    r = httpx.post(url + "/api/create", json={"model": name, "from": str(path), "stream": False}, timeout=120)
    assert r.status_code == 200, r.text


@contextlib.contextmanager
def serving(tmp: Path, model_path: Path, extra_args: list[str] = (), extra_env: dict[str, str] | None = None,
            timeout: float = 180.0, name: str = "tiny") -> Iterator[Server]:
    """A server subprocess with `model_path` created as `name`, stopped on exit."""
    srv = start_server(tmp, list(extra_args), extra_env, timeout)
    try:
        create_model(srv.url, name, model_path)
        yield srv
    finally:
        stop_server(srv)


def greedy_texts(model_path: Path, prompts: list[str], num_predict: int, quant: str | None = "native") -> dict[str, str]:
    """The reference a server's answers are compared with: each prompt's greedy text from the in-process engine
    on the same file (all prompts batched together, as the engine's continuous batching runs them), in the
    server's default weight format (`auto`: quant "native") unless told otherwise."""
    from ollama_distributed.model.options import GenerationOptions
    from ollama_distributed.model.tokenizer import Tokenizer
    from ollama_distributed.runtime.engine import GenerationRequest, InferenceEngine
    from ollama_distributed.runtime.local_executor import LocalExecutor

    tok = Tokenizer.from_gguf(model_path)
    opts = GenerationOptions(temperature=0, num_predict=num_predict)
    with InferenceEngine(LocalExecutor(model_path, quant=quant), tok, max_batch=8) as engine:
        handles = {p: engine.submit(GenerationRequest(prompt_ids=tok.encode(p), options=opts)) for p in prompts}
        return {p: h.result().text for p, h in handles.items()}


def greedy_gaps(model_path: Path, prompts: list[str], num_predict: int, quant: str | None = "native"
                ) -> dict[str, tuple[float, int]]:
    """Per prompt, the smallest gap between the top two logits along its greedy path, relative to the top logit,
    and the generated token where it occurs: how far that path is from a near-tie that float rounding (other batch
    shapes, a replay after recovery) could flip."""
    import torch

    from ollama_distributed.model.tokenizer import Tokenizer
    from ollama_distributed.runtime.local_executor import LocalExecutor

    tok = Tokenizer.from_gguf(model_path)
    ex = LocalExecutor(model_path, quant=quant)
    out = {}
    try:
        for sid, prompt in enumerate(prompts):
            logits, worst = ex.step([sid], [tok.encode(prompt)])[-1], (float("inf"), -1)
            for i in range(num_predict):
                top = torch.topk(logits.float(), 2).values
                worst = min(worst, (float(top[0] - top[1]) / abs(float(top[0])), i))
                logits = ex.step([sid], [[int(logits.argmax())]])[-1]
            ex.free(sid)
            out[prompt] = worst
    finally:
        ex.close()
    return out


def end_process_group(proc: subprocess.Popen) -> None:
    """End what a test started in its own process group (e.g. a joining `ray start`), never other Ray processes
    on the machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(20)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    """One real server for the session, with the tiny model created as `tiny` (from the GGUF path)."""
    tmp = tmp_path_factory.mktemp("server")
    write_ollama_store(tmp / "ollama-models", tiny_gguf, ("registry.ollama.ai", "library", "ollamatiny", "latest"))
    with serving(tmp, tiny_gguf) as srv:
        yield srv
