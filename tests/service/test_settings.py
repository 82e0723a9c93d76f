"""Server settings from the environment: OLLAMA_HOST, keep_alive durations, store roots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ollama_distributed.service.settings import (
    InvalidDurationError, ServerSettings, parse_go_duration, parse_host, parse_keep_alive,
)


@pytest.mark.parametrize("text, seconds", [("5m", 300), ("1h30m", 5400), ("0", 0), ("1.5s", 1.5), ("-1s", -1),
                                           ("250ms", 0.25), ("2h", 7200), ("1m0.5s", 60.5)])
def test_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "m", "1h 2m", "forever"])
def test_go_duration_invalid(text: str) -> None:
    with pytest.raises(InvalidDurationError):
        parse_go_duration(text)


def test_keep_alive() -> None:
    assert parse_keep_alive(None, 300) == 300
    assert parse_keep_alive(0, 300) == 0
    assert parse_keep_alive(10, 300) == 10
    assert parse_keep_alive("10", 300) == 10
    assert parse_keep_alive("5m", 300) == 300
    assert math.isinf(parse_keep_alive(-1, 300)) and math.isinf(parse_keep_alive("-1m", 300))
    for bad in (True, [1], "soon"):
        with pytest.raises(InvalidDurationError):
            parse_keep_alive(bad, 300)


def test_host() -> None:
    assert parse_host(None) == ("127.0.0.1", 11434)
    assert parse_host("0.0.0.0") == ("0.0.0.0", 11434)
    assert parse_host("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_host("http://example.com") == ("example.com", 80)
    assert parse_host("https://example.com") == ("example.com", 443)
    assert parse_host("[::1]:9000") == ("::1", 9000)


def test_from_env(tmp_path: Path) -> None:
    s = ServerSettings.from_env({"OLLAMA_HOST": "127.0.0.1:9999", "OLLAMA_DISTRIBUTED_MODELS": str(tmp_path / "a"),
                                 "OLLAMA_MODELS": str(tmp_path / "b"), "OLLAMA_KEEP_ALIVE": "1m",
                                 "OLLAMA_CONTEXT_LENGTH": "2048", "OLLAMA_ORIGINS": "http://x, http://y"},
                                port=1234)
    assert (s.host, s.port) == ("127.0.0.1", 1234)
    assert s.models_dir == tmp_path / "a" and s.ollama_models_dir == tmp_path / "b"
    assert s.keep_alive_s == 60 and s.num_ctx == 2048 and s.origins == ("http://x", "http://y")
    assert not s.distributed
    with pytest.raises(ValueError, match="OLLAMA_CONTEXT_LENGTH"):
        ServerSettings.from_env({"OLLAMA_CONTEXT_LENGTH": "big"})
    with pytest.raises(ValueError, match="mutually exclusive"):
        ServerSettings(address="auto", local_nodes=2)
    with pytest.raises(ValueError, match="strategy"):
        ServerSettings(strategy="magic")
