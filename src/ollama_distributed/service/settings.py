"""Server settings, read from the environment once at the edge (CLI) and passed inward as a frozen object.

Environment variables follow Ollama's envconfig/config.go where one exists:
  OLLAMA_HOST            listen address `[scheme://]host[:port]` (default 127.0.0.1:11434)
  OLLAMA_MODELS          an existing Ollama store, used read-only (default ~/.ollama/models)
  OLLAMA_KEEP_ALIVE      default keep_alive (default 5m)
  OLLAMA_CONTEXT_LENGTH  default num_ctx (default 4096)
  OLLAMA_ORIGINS         extra allowed CORS origins, comma-separated
  OLLAMA_MAX_QUEUE       requests waiting per model before 503 (default 512)
  OLLAMA_NUM_PARALLEL    sequences decoded together per model (default 8)
and our own:
  OLLAMA_DISTRIBUTED_MODELS        our writable store (default ~/.ollama-distributed/models)
  OLLAMA_DISTRIBUTED_MAX_REPLICAS  copies of a model placed on disjoint nodes (default 1; 0 = as many as fit)
  OLLAMA_DISTRIBUTED_AUTOTUNE      try the top candidate plans for a few decode steps on load (default 1 = on)
  OLLAMA_DISTRIBUTED_REPLAN        apply drift re-plan proposals and better plans after a node joins, when the
                                   model is idle (default 1 = on)
  OLLAMA_DISTRIBUTED_API_KEY       when set, every endpoint but / and /api/version needs `Authorization: Bearer KEY`
  OLLAMA_DISTRIBUTED_TEST_SLOW_NODES  TEST HOOK, never for production: "node1:0.05,node2:0.1" makes every step
                                   of an executor with a shard on node1 sleep 0.05 s more (service/router.py
                                   SlowedExecutor), to test routing and re-planning against a slow node
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..model import formats

DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE_S = 300.0
FOREVER = math.inf
# weight formats the server accepts (model/formats.py; auto: every tensor in its file type)
DTYPES = formats.WEIGHT_FORMATS
KV_CACHE_TYPES = formats.KV_CACHE_TYPES  # f32|f16|q8_0, Ollama's OLLAMA_KV_CACHE_TYPE names

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class InvalidDurationError(ValueError):
    """A keep_alive value that is neither a number of seconds nor a Go duration string."""


def parse_go_duration(text: str) -> float:
    """Seconds in a Go `time.ParseDuration` string ("5m", "1h30m", "-1s", "0"). Raises InvalidDurationError."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign, s = (-1.0 if s[0] == "-" else 1.0), s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise InvalidDurationError(f"time: invalid duration {text!r}")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _GO_DURATION.match(s, pos)
        if not m:
            raise InvalidDurationError(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_keep_alive(value: Any, default: float) -> float:
    """keep_alive → seconds (inf = forever), as Ollama's api.Duration: a number is seconds, a string a Go duration
    (a bare numeric string is taken as seconds); negative means forever, 0 unload at once; None → default."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidDurationError(f"invalid keep_alive {value!r}: expected seconds or a duration like \"5m\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = parse_go_duration(value)
    else:
        raise InvalidDurationError(f"invalid keep_alive {value!r}: expected seconds or a duration like \"5m\"")
    if math.isnan(seconds):
        raise InvalidDurationError("invalid keep_alive NaN")
    return FOREVER if seconds < 0 else seconds


def parse_host(value: str | None) -> tuple[str, int]:
    """OLLAMA_HOST → (host, port), like envconfig.Host: no scheme means http, no port means 11434 (80/443 only
    when an explicit http/https scheme is given without a port, mirroring the ollama client)."""
    raw = (value or "").strip().strip("\"'")
    if not raw:
        return "127.0.0.1", DEFAULT_PORT
    has_scheme = "://" in raw
    parts = urlsplit(raw if has_scheme else f"http://{raw}")
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"OLLAMA_HOST {value!r}: invalid port") from exc
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme, DEFAULT_PORT) if has_scheme else DEFAULT_PORT
    return host, port


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs; build with `from_env` at the edge.

    models_dir: our writable Ollama-layout store. ollama_models_dir: a user's Ollama store, read-only (None: off).
    keep_alive_s: default keep_alive (inf = forever). num_ctx: default context window (OLLAMA_CONTEXT_LENGTH).
    max_queue / num_parallel: per-model engine queue bound and batch size. origins: extra CORS origins.
    address / local_nodes / node_memory / strategy: where models run (None + 0 = in-process LocalExecutor).
    dtype: weight format name (DTYPES). kv_cache_type: f32|f16|q8_0 (OLLAMA_KV_CACHE_TYPE; None: f16 for auto, else the
      compute dtype). include_bundled: list the bundled SmolLM2.
    max_loaded: models kept loaded at once (the least recently used is unloaded to make room).
    max_replicas: copies of each model placed on disjoint nodes when the cluster holds more than one (1 = one
      copy, today's behaviour; 0 = as many as fit); requests go to the replica with the least outstanding work
      weighted by its measured speed (service/router.py).
    autotune: on load with strategy "auto", when more than one plan is feasible, run the `autotune_candidates`
      best-predicted plans for `autotune_steps` decode steps each and keep the fastest measured.
    replan: when a model is idle, apply the learning loop's drift re-plan proposal, and use nodes that joined
      (an extra replica up to max_replicas, or a plan predicted faster). placement_poll_s: how often the
      cluster's membership and pending proposals are checked.
    test_slow_nodes: TEST HOOK (OLLAMA_DISTRIBUTED_TEST_SLOW_NODES): (node, seconds) — an executor with a shard
      on the node sleeps that long before every step.
    api_key: None (open, the default) or the key every endpoint but / and /api/version requires as a Bearer token.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    models_dir: Path = field(default_factory=lambda: Path.home() / ".ollama-distributed" / "models")
    ollama_models_dir: Path | None = None
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    num_ctx: int = 4096
    max_queue: int = 512
    num_parallel: int = 8
    origins: tuple[str, ...] = ()
    address: str | None = None
    local_nodes: int = 0
    node_memory: str | None = None
    strategy: str = "auto"
    dtype: str = "auto"
    kv_cache_type: str | None = None
    include_bundled: bool = True
    max_loaded: int = 3
    max_replicas: int = 1
    autotune: bool = True
    autotune_candidates: int = 3
    autotune_steps: int = 4
    replan: bool = True
    placement_poll_s: float = 2.0
    test_slow_nodes: tuple[tuple[str, float], ...] = ()
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.num_ctx < 1 or self.max_queue < 0 or self.num_parallel < 1 or self.max_loaded < 1:
            raise ValueError(
                f"num_ctx ({self.num_ctx}), num_parallel ({self.num_parallel}), max_loaded ({self.max_loaded}) "
                f"must be >= 1 and max_queue ({self.max_queue}) >= 0"
            )
        if self.address and self.local_nodes:
            raise ValueError("--address and --local-nodes are mutually exclusive")
        if self.node_memory and not self.local_nodes:
            raise ValueError("--node-memory applies to --local-nodes (declare memory on real nodes with `ray start`)")
        if self.local_nodes < 0:
            raise ValueError(f"--local-nodes must be >= 0, got {self.local_nodes}")
        if self.strategy not in ("auto", "single", "pipeline", "tensor", "hybrid"):
            raise ValueError(f"unknown strategy {self.strategy!r}: expected auto|single|pipeline|tensor|hybrid")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: expected {'|'.join(DTYPES)}")
        if self.kv_cache_type is not None and self.kv_cache_type not in KV_CACHE_TYPES:
            raise ValueError(f"unknown KV cache type {self.kv_cache_type!r} (OLLAMA_KV_CACHE_TYPE / --kv-cache-type): "
                             f"expected {'|'.join(KV_CACHE_TYPES)}")
        if self.max_replicas < 0:
            raise ValueError(f"max_replicas must be >= 0 (0 = as many as fit), got {self.max_replicas}")
        if not 1 <= self.autotune_candidates <= 3 or not 1 <= self.autotune_steps <= 32:
            raise ValueError(f"autotune_candidates ({self.autotune_candidates}) must be in 1..3 and autotune_steps "
                             f"({self.autotune_steps}) in 1..32: autotune must keep the load time bounded")
        if not self.placement_poll_s > 0:
            raise ValueError(f"placement_poll_s must be > 0, got {self.placement_poll_s}")
        if self.api_key is not None and (not self.api_key.strip() or any(c.isspace() for c in self.api_key)):
            raise ValueError("the API key must be non-empty and contain no whitespace")
        bad = [(n, d) for n, d in self.test_slow_nodes if not n or d < 0]
        if bad:
            raise ValueError(f"test_slow_nodes entries need a node name and a delay >= 0, got {bad}")

    @property
    def distributed(self) -> bool:
        """True when models run on a Ray cluster rather than in this process."""
        return bool(self.address or self.local_nodes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "ServerSettings":
        """Settings from environment variables (see module docstring); keyword overrides win (CLI flags)."""
        env = os.environ if env is None else env
        host, port = parse_host(env.get("OLLAMA_HOST"))
        own = env.get("OLLAMA_DISTRIBUTED_MODELS")
        ollama = env.get("OLLAMA_MODELS")
        ollama_dir = Path(ollama).expanduser() if ollama else Path.home() / ".ollama" / "models"
        values: dict[str, Any] = {
            "host": host,
            "port": port,
            "models_dir": Path(own).expanduser() if own else Path.home() / ".ollama-distributed" / "models",
            "ollama_models_dir": ollama_dir,
            "keep_alive_s": parse_keep_alive(env.get("OLLAMA_KEEP_ALIVE") or None, DEFAULT_KEEP_ALIVE_S),
            "num_ctx": _env_int(env, "OLLAMA_CONTEXT_LENGTH", 4096),
            "max_queue": _env_int(env, "OLLAMA_MAX_QUEUE", 512),
            "num_parallel": _env_int(env, "OLLAMA_NUM_PARALLEL", 8),
            "origins": tuple(o.strip() for o in env.get("OLLAMA_ORIGINS", "").split(",") if o.strip()),
            "max_replicas": _env_int(env, "OLLAMA_DISTRIBUTED_MAX_REPLICAS", 1),
            "autotune": _env_bool(env, "OLLAMA_DISTRIBUTED_AUTOTUNE", True),
            "replan": _env_bool(env, "OLLAMA_DISTRIBUTED_REPLAN", True),
            "kv_cache_type": formats.kv_cache_type_from_env(env),
            "test_slow_nodes": parse_slow_nodes(env.get("OLLAMA_DISTRIBUTED_TEST_SLOW_NODES", "")),
            "api_key": env.get("OLLAMA_DISTRIBUTED_API_KEY") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def parse_slow_nodes(text: str) -> tuple[tuple[str, float], ...]:
    """TEST HOOK value "node1:0.05,node2:0.1" → (("node1", 0.05), ("node2", 0.1)); "" → ()."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        node, sep, delay = part.rpartition(":")
        try:
            seconds = float(delay)
        except ValueError:
            seconds = -1.0
        if not sep or not node or seconds < 0:
            raise ValueError(f"OLLAMA_DISTRIBUTED_TEST_SLOW_NODES entry {part!r}: expected NODE:SECONDS, e.g. "
                             "node1:0.05")
        out.append((node, seconds))
    return tuple(out)


def _env_bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = (env.get(key) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key}={env.get(key)!r} is not a boolean (use 1/0, true/false)")


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not an integer") from None
