"""Prometheus metrics of the server, on a dedicated CollectorRegistry (never the process-global one, so that two
servers in one process — tests — do not collide).

What is exported (prefix `ollama_distributed_`):
  requests_total{endpoint,model,status}            every HTTP request (RequestMetricsMiddleware)
  time_to_first_token_seconds{model}               histogram: submit → first generated token
  inter_token_latency_seconds{model}               histogram: gap between consecutive tokens of one sequence
  tokens_generated_total{model}, prompt_tokens_total{model}
  queue_depth{model}, running_sequences{model}     engine state, refreshed at scrape time
  node_up{node}, node_memory_bandwidth_bytes_per_second{node}, node_flops{node},
  node_memory_available_bytes{node}, node_calibration_factor{node}
  decode_ms_per_token{model,kind="measured|predicted"}
  generation_failures_total{model}, recoveries_total{model}, replans_total{model,outcome="proposed|applied"},
  events_total{kind}
  strategy_executions_total{strategy}, strategy_successes_total, strategy_failures_total,
  strategy_success_rate, strategy_ema_latency_ms, strategy_ema_tokens_per_second, strategy_weight,
  strategy_enabled                                 (StrategyCollector: read from PartitionManager.to_dict())
Model labels are capped (`max_models` distinct values, then "_other") because a model name comes from the client.
Histogram buckets follow vLLM's TTFT / inter-token choices (vllm/engine/metrics.py), widened for CPU decoding.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "ollama_distributed"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0)
OTHER = "_other"
_BODY_LIMIT = 1 << 20  # model names are read from JSON bodies up to 1 MiB; larger bodies (blob uploads) are not parsed


class ServerMetrics:
    """All server metrics on one registry; the `observe_*` / `set_*` methods are what the server calls."""

    def __init__(self, registry: CollectorRegistry | None = None, max_models: int = 64,
                 rate_window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry or CollectorRegistry()
        self.max_models = max_models
        self.rate_window_s = rate_window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._models: set[str] = set()
        self._token_times: dict[str, deque[tuple[float, int]]] = {}
        r = self.registry
        p = PREFIX
        self.requests = Counter(f"{p}_requests", "HTTP requests by endpoint (route template), model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time from submit to the first generated token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.tokens = Counter(f"{p}_tokens_generated", "Generated tokens", ["model"], registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens evaluated", ["model"], registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Requests waiting for a batch slot", ["model"], registry=r)
        self.running = Gauge(f"{p}_running_sequences", "Sequences decoding now", ["model"], registry=r)
        self.node_up = Gauge(f"{p}_node_up", "1 when the node is alive", ["node"], registry=r)
        self.node_bandwidth = Gauge(f"{p}_node_memory_bandwidth_bytes_per_second", "Measured memory bandwidth",
                                    ["node"], registry=r)
        self.node_flops = Gauge(f"{p}_node_flops", "Measured FLOP/s", ["node"], registry=r)
        self.node_memory = Gauge(f"{p}_node_memory_available_bytes", "Memory available on the node", ["node"],
                                 registry=r)
        self.node_factor = Gauge(f"{p}_node_calibration_factor",
                                 "Measured / predicted time on the node (1 = as declared, 2 = twice slower)",
                                 ["node"], registry=r)
        self.decode_ms = Gauge(f"{p}_decode_ms_per_token", "Decode time per token of the running plan",
                               ["model", "kind"], registry=r)
        self.failures = Counter(f"{p}_generation_failures", "Generations that ended with an error", ["model"],
                                registry=r)
        self.recoveries = Counter(f"{p}_recoveries", "Recoveries after a shard or node failure", ["model"],
                                  registry=r)
        self.replans = Counter(f"{p}_replans", "Re-plans proposed and applied", ["model", "outcome"], registry=r)
        self.events = Counter(f"{p}_events", "Decision events recorded", ["kind"], registry=r)

    # --- labels ----------------------------------------------------------------------------------------------
    def model_label(self, model: str | None) -> str:
        if not model:
            return ""
        with self._lock:
            if model in self._models:
                return model
            if len(self._models) >= self.max_models:
                return OTHER
            self._models.add(model)
            return model

    # --- request and token observations ----------------------------------------------------------------------
    def observe_request(self, endpoint: str, model: str | None, status: int | str) -> None:
        self.requests.labels(endpoint, self.model_label(model), str(status)).inc()

    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.labels(self.model_label(model)).observe(max(0.0, seconds))

    def observe_token(self, model: str, seconds_since_last: float | None, count: int = 1) -> None:
        """`count` tokens arrived; `seconds_since_last` is the gap since this sequence's previous token (None for
        the first token, whose latency is the TTFT)."""
        label = self.model_label(model)
        if count > 0:
            self.tokens.labels(label).inc(count)
            now = self._clock()
            with self._lock:
                q = self._token_times.setdefault(label, deque())
                q.append((now, count))
                self._trim(q, now)
        if seconds_since_last is not None:
            self.itl.labels(label).observe(max(0.0, seconds_since_last))

    def observe_prompt(self, model: str, tokens: int) -> None:
        if tokens > 0:
            self.prompt_tokens.labels(self.model_label(model)).inc(tokens)

    def observe_failure(self, model: str) -> None:
        self.failures.labels(self.model_label(model)).inc()

    def observe_recovery(self, model: str) -> None:
        self.recoveries.labels(self.model_label(model)).inc()

    def observe_replan(self, model: str, outcome: str) -> None:
        self.replans.labels(self.model_label(model), outcome).inc()

    def observe_event(self, kind: str) -> None:
        self.events.labels(kind).inc()

    def set_decode_ms(self, model: str, measured: float | None, predicted: float | None) -> None:
        label = self.model_label(model)
        if measured is not None:
            self.decode_ms.labels(label, "measured").set(measured)
        if predicted is not None:
            self.decode_ms.labels(label, "predicted").set(predicted)

    # --- state refreshed at scrape time ----------------------------------------------------------------------
    def set_engines(self, engines: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """(model, engine.stats()) of every loaded model; models no longer loaded disappear."""
        self.queue_depth.clear()
        self.running.clear()
        for model, stats in engines:
            label = self.model_label(model)
            self.queue_depth.labels(label).set(float(stats.get("waiting", 0)))
            self.running.labels(label).set(float(stats.get("running", 0)))

    def set_nodes(self, nodes: Iterable[Mapping[str, Any]], factors: Mapping[str, float] | None = None) -> None:
        """Nodes as /api/distributed/status lists them ({"id", "name"?, "state", "measured": {...}})."""
        for g in (self.node_up, self.node_bandwidth, self.node_flops, self.node_memory, self.node_factor):
            g.clear()
        for n in nodes:
            name = str(n.get("name") or n.get("id"))
            m = n.get("measured") or {}
            self.node_up.labels(name).set(1.0 if n.get("state", "alive") == "alive" else 0.0)
            if m.get("memory_bandwidth"):
                self.node_bandwidth.labels(name).set(float(m["memory_bandwidth"]))
            if m.get("flops"):
                self.node_flops.labels(name).set(float(m["flops"]))
            avail = m.get("memory_available") or m.get("memory_available_bytes")
            if avail:
                self.node_memory.labels(name).set(float(avail))
        for name, f in (factors or {}).items():
            self.node_factor.labels(name).set(f)

    # --- derived -------------------------------------------------------------------------------------------
    def _trim(self, q: deque[tuple[float, int]], now: float) -> None:
        while q and q[0][0] < now - self.rate_window_s:
            q.popleft()

    def tokens_per_s(self) -> dict[str, float]:
        """Generated tokens per second over the last `rate_window_s`, per model (live throughput)."""
        now = self._clock()
        out = {}
        with self._lock:
            for model, q in self._token_times.items():
                self._trim(q, now)
                out[model] = sum(n for _, n in q) / self.rate_window_s
        return out

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


class StrategyCollector(Collector):
    """Per-strategy metrics read from a PartitionManager's `to_dict()` at scrape time."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Any]:
        data = self.manager.to_dict()["strategies"]
        p = f"{PREFIX}_strategy"
        fams = {
            "executions": CounterMetricFamily(f"{p}_executions", "Executions reported", labels=["strategy"]),
            "successes": CounterMetricFamily(f"{p}_successes", "Successful executions", labels=["strategy"]),
            "failures": CounterMetricFamily(f"{p}_failures", "Failed executions", labels=["strategy"]),
        }
        gauges = {
            "success_rate": GaugeMetricFamily(f"{p}_success_rate", "successes / executions", labels=["strategy"]),
            "ema_latency_ms": GaugeMetricFamily(f"{p}_ema_latency_ms", "EMA of measured ms per token",
                                                labels=["strategy"]),
            "ema_tokens_per_s": GaugeMetricFamily(f"{p}_ema_tokens_per_second", "EMA of measured tokens/s",
                                                  labels=["strategy"]),
        }
        weight = GaugeMetricFamily(f"{p}_weight", "Selection weight (sums to 1)", labels=["strategy"])
        enabled = GaugeMetricFamily(f"{p}_enabled", "1 when the strategy may be selected", labels=["strategy"])
        for name, d in sorted(data.items()):
            st = d["stats"]
            for key, counter in fams.items():
                counter.add_metric([name], float(st[key]))
            for key, gauge in gauges.items():
                if st.get(key) is not None:
                    gauge.add_metric([name], float(st[key]))
            weight.add_metric([name], float(d["weight"]))
            enabled.add_metric([name], 1.0 if d["enabled"] else 0.0)
        yield from fams.values()
        yield from gauges.values()
        yield weight
        yield enabled


class RequestMetricsMiddleware:
    """Pure ASGI middleware counting every HTTP request by route template, model and status.

    The model is read from the JSON body as it streams past the app (no buffering, the app receives the same
    messages), so handlers need no change; the endpoint label is the matched route's template
    ("/v1/models/{model}"), or "unmatched" for 404s on unknown paths, keeping label cardinality bounded."""

    def __init__(self, app: Any, metrics: ServerMetrics, exclude: tuple[str, ...] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.exclude = exclude

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exclude:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        capture = scope.get("method") == "POST"
        status = 500

        async def recv() -> Any:
            msg = await receive()
            if capture and msg.get("type") == "http.request" and len(body) <= _BODY_LIMIT:
                body.extend(msg.get("body", b""))
            return msg

        async def snd(msg: Any) -> None:
            nonlocal status
            if msg.get("type") == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, recv, snd)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or ("unmatched" if status == 404 else scope.get("path", ""))
            self.metrics.observe_request(str(endpoint), _model_of(bytes(body)), status)


def _model_of(body: bytes) -> str | None:
    if not body or len(body) > _BODY_LIMIT:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= 200 else None


class TimedHandle:
    """Wraps an engine RequestHandle: same iteration (sync and async) and attributes, plus TTFT, inter-token
    latency and token counts of its chunks, and `on_final(model, chunk, batch)` when the last chunk (done=True)
    arrives. Token times are the engine's (`chunk.time`, on `clock`'s perf_counter scale), so a consumer that
    reads chunks in a burst (a non-streaming request, woken only at the end) measures the same as one that
    streams; `batch` averages the step batch size the engine stamps on each token chunk. Chunks without these
    stamps fall back to `clock()` at arrival and to `batch_fn` (e.g. lambda: engine.stats()["running"])."""

    def __init__(self, handle: Any, model: str, metrics: ServerMetrics,
                 on_final: Callable[[str, Any, float], None] | None = None,
                 batch_fn: Callable[[], int] | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self._handle = handle
        self._model = model
        self._metrics = metrics
        self._on_final = on_final
        self._batch_fn = batch_fn
        self._clock = clock
        self._start = clock()
        self._last: float | None = None
        self._batch_sum = 0.0
        self._batch_n = 0
        self._finished = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def _seen(self, chunk: Any) -> None:
        n = len(getattr(chunk, "token_ids", ()) or ())
        if n:
            now = getattr(chunk, "time", 0.0) or self._clock()
            if self._last is None:
                self._metrics.observe_ttft(self._model, now - self._start)
                self._metrics.observe_token(self._model, None, n)
            else:
                self._metrics.observe_token(self._model, (now - self._last) / n, n)
            self._last = now
            batch = getattr(chunk, "batch", 0) or 0
            if batch > 0:
                self._batch_sum += batch
                self._batch_n += 1
            elif self._batch_fn is not None:
                try:
                    self._batch_sum += max(1, int(self._batch_fn()))
                    self._batch_n += 1
                except Exception:  # noqa: BLE001 - a stats call must never break a stream
                    pass
        if getattr(chunk, "done", False) and not self._finished:
            self._finished = True
            self._metrics.observe_prompt(self._model, int(getattr(chunk, "prompt_eval_count", 0) or 0))
            if getattr(chunk, "error", None):
                self._metrics.observe_failure(self._model)
            if self._on_final is not None:
                batch = self._batch_sum / self._batch_n if self._batch_n else 1.0
                self._on_final(self._model, chunk, batch)

    def __iter__(self) -> Iterator[Any]:
        for chunk in self._handle:
            self._seen(chunk)
            yield chunk

    async def _aiter(self) -> AsyncIterator[Any]:
        async for chunk in self._handle:
            self._seen(chunk)
            yield chunk

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()
