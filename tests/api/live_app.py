"""Run a FastAPI app as a real uvicorn server on a free 127.0.0.1 port, in a thread of the test process (so tests
can hold the app's objects — the LearningLoop — while talking HTTP to it)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveApp:
    url: str
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_app(app: Any, timeout: float = 120.0) -> LiveApp:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup")
        if server.started:
            try:
                httpx.get(url + "/metrics", timeout=5.0)
                return LiveApp(url, app, server, thread)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    server.should_exit = True
    raise RuntimeError(f"server on {url} did not start within {timeout} s")


def server_app(models_dir: Path, **settings: Any) -> Any:
    """The real server application (api.app.create_app, which installs observability), stores under models_dir."""
    from ollama_distributed.api.app import create_app
    from ollama_distributed.service.settings import ServerSettings

    app = create_app(ServerSettings(models_dir=models_dir, ollama_models_dir=None, include_bundled=False,
                                    **settings))
    return app


def run_with_server(app: Any, fn: Any, timeout: float = 600.0) -> Any:
    """Serve `app` with uvicorn on the MAIN thread (Ray, started by a distributed server's lifespan, installs
    signal handlers and so must start there) and call `fn(url)` in a worker thread once it answers; stop the
    server when fn returns and re-raise whatever fn raised. Returns fn's result."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    url = f"http://127.0.0.1:{port}"
    outcome: dict[str, Any] = {}

    def worker() -> None:
        try:
            deadline = time.monotonic() + timeout
            while not server.started:
                if time.monotonic() > deadline or server.should_exit:
                    raise RuntimeError(f"server on {url} did not start within {timeout} s")
                time.sleep(0.1)
            outcome["result"] = fn(url)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test thread
            outcome["error"] = exc
        finally:
            server.should_exit = True

    thread = threading.Thread(target=worker, name="test-client", daemon=True)
    thread.start()
    server.run()
    thread.join(60)
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome and not server.started:
        raise RuntimeError("uvicorn exited during startup (see the captured log)")
    return outcome.get("result")
