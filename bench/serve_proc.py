"""A real `ollama-distributed serve` process on a free 127.0.0.1 port, for the benchmarks that measure through the
API (hot_path_bench, native_bench, structured_bench): started in its own model store, waited for until it
answers, stopped when the block ends. Its log stays in the store directory, which is kept when the start fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import httpx


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen
    url: str
    home: Path  # the model store and the log (serve.log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: Sequence[str] = (), env: dict[str, str] | None = None, src: str | None = None,
            timeout_s: float = 300.0) -> Iterator[Server]:
    """`serve *args` with `env` over this environment; `src`: another checkout's package first on the path."""
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="od-bench-"))
    # (HOME stays: a fresh one would recompile the CPU kernels in every server, whose compiler processes then
    # count in native_bench's memory figures)
    full = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}",
            "OLLAMA_DISTRIBUTED_MODELS": str(home / "models"), "OLLAMA_MODELS": str(home / "none"), **(env or {})}
    if src is not None:
        full["PYTHONPATH"] = os.pathsep.join(filter(None, [src, full.get("PYTHONPATH")]))
    log = open(home / "serve.log", "wb")  # (a pipe nobody reads would block the server once full)
    proc = subprocess.Popen([sys.executable, "-m", "ollama_distributed.cli", "serve", "--log-level", "warning", *args],
                            env=full, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    ok = False
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(url + "/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve {' '.join(args)} did not start (see {home / 'serve.log'})")
            time.sleep(0.2)
        yield Server(proc, url, home)
        ok = True
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if ok:
            shutil.rmtree(home, ignore_errors=True)
