"""A small client for a running server (ours or Ollama), used by the CLI: host resolution like the `ollama`
Python client, streaming NDJSON, one error type, and `run_via_server` for `ollama-distributed run`."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterator, TextIO
from urllib.parse import urlsplit

import httpx


class ServerError(RuntimeError):
    """The server answered with an error (message from its `{"error": ...}`) or could not be reached."""

    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


def resolve_host(host: str | None = None) -> str:
    """Base URL: `host` › OLLAMA_HOST › http://127.0.0.1:11434. No scheme → http and port 11434; an explicit
    http/https scheme without a port → 80/443 (ollama-python `_parse_host`). 0.0.0.0 (listen-all) → loopback."""
    raw = (host or os.environ.get("OLLAMA_HOST") or "").strip().strip("\"'")
    if not raw:
        return "http://127.0.0.1:11434"
    has_scheme = "://" in raw
    parts = urlsplit(raw if has_scheme else f"http://{raw}")
    scheme = parts.scheme or "http"
    hostname = parts.hostname or "127.0.0.1"
    if hostname in ("0.0.0.0", "::"):
        hostname = "127.0.0.1"
    port = parts.port or ({"http": 80, "https": 443}[scheme] if has_scheme else 11434)
    if ":" in hostname:
        hostname = f"[{hostname}]"
    return f"{scheme}://{hostname}:{port}{parts.path.rstrip('/')}"


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err:
            return str(err)
    except ValueError:
        pass
    return response.text.strip() or f"HTTP {response.status_code}"


def resolve_api_key(api_key: str | None = None) -> str | None:
    """The key sent as `Authorization: Bearer`: `api_key` › OLLAMA_DISTRIBUTED_API_KEY (the server's own
    variable) › OLLAMA_API_KEY (what the `ollama` clients read); None sends no header."""
    return api_key or os.environ.get("OLLAMA_DISTRIBUTED_API_KEY") or os.environ.get("OLLAMA_API_KEY") or None


class Client:
    """Synchronous API client. Every method raises ServerError with the server's message."""

    def __init__(self, host: str | None = None, timeout: float | None = None, api_key: str | None = None) -> None:
        self.base = resolve_host(host)
        key = resolve_api_key(api_key)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self.http = httpx.Client(base_url=self.base, timeout=httpx.Timeout(timeout, connect=5.0), headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_running(self, timeout: float = 1.0) -> bool:
        """True when something answering like Ollama listens at the host."""
        try:
            r = self.http.get("/", timeout=timeout)
            return r.status_code == 200 and "Ollama is running" in r.text
        except httpx.HTTPError:
            return False

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            raise ServerError(f"could not connect to a server at {self.base}: is `ollama-distributed serve` "
                              "running? (set OLLAMA_HOST to point elsewhere)") from None
        except httpx.HTTPError as exc:
            raise ServerError(f"request to {self.base}{path} failed: {exc}") from None
        if r.status_code >= 400:
            raise ServerError(_error_text(r), r.status_code)
        return r

    def get(self, path: str) -> Any:
        return self.request("GET", path).json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, json=body).json()

    def stream(self, path: str, body: dict[str, Any], method: str = "POST") -> Iterator[dict[str, Any]]:
        """NDJSON objects of a streaming endpoint; an in-band `{"error"}` line raises ServerError."""
        try:
            with self.http.stream(method, path, json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ServerError(_error_text(r), r.status_code)
                for line in r.iter_lines():
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    if "error" in obj:
                        raise ServerError(str(obj["error"]))
                    yield obj
        except httpx.ConnectError:
            raise ServerError(f"could not connect to a server at {self.base}: is `ollama-distributed serve` "
                              "running? (set OLLAMA_HOST to point elsewhere)") from None

    def upload_blob(self, digest: str, path: str, progress: Callable[[int], None] | None = None) -> None:
        """HEAD then POST /api/blobs/<digest> with the file's bytes (streamed)."""
        if self.head_blob(digest):
            if progress:
                progress(os.path.getsize(path))
            return

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    if progress:
                        progress(len(chunk))
                    yield chunk

        self.request("POST", f"/api/blobs/{digest}", content=chunks())

    def head_blob(self, digest: str) -> bool:
        try:
            self.request("HEAD", f"/api/blobs/{digest}")
            return True
        except ServerError as exc:
            if exc.status == 404:
                return False
            raise


def run_via_server(host: str | None, model: str, prompt: str | None, *, options: dict[str, Any] | None = None,
                   system: str | None = None, out: TextIO | None = None, input_fn: Callable[[str], str] = input,
                   keep_alive: Any = None) -> bool:
    """`ollama-distributed run` through a server: False when no server answers at the host (the caller then
    runs embedded); True after streaming the answer (with `prompt`) or an interactive chat (without: reads lines
    until EOF or "/bye"). Raises ServerError when the server reports an error (unknown model, bad option, ...)."""
    out = out or sys.stdout
    client = Client(host, timeout=None)
    try:
        if not client.is_running():
            return False
        extra: dict[str, Any] = {}
        if options:
            extra["options"] = options
        if keep_alive is not None:
            extra["keep_alive"] = keep_alive
        if prompt is not None:
            body = {"model": model, "prompt": prompt, **extra}
            if system:
                body["system"] = system
            for obj in client.stream("/api/generate", body):
                out.write(obj.get("response", ""))
                out.flush()
            out.write("\n")
            return True
        # Load first so a bad name fails before the first prompt (like `ollama run`).
        client.post("/api/generate", {"model": model, **extra})
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        while True:
            try:
                line = input_fn(">>> ")
            except EOFError:
                out.write("\n")
                return True
            if line.strip() in ("/bye", "/exit"):
                return True
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            for obj in client.stream("/api/chat", {"model": model, "messages": messages, **extra}):
                piece = obj.get("message", {}).get("content", "")
                reply.append(piece)
                out.write(piece)
                out.flush()
            out.write("\n\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    finally:
        client.close()
