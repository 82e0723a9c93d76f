"""A bounded, thread-safe log of the decisions the system takes, each also written as a structured log line.

Kinds used by the server: "plan" (a plan was chosen and why), "autotune", "failure", "recovery",
"replan_proposed", "replan", "node" (joined / lost), "calibration". Any other short identifier is accepted, so
that new decisions need no change here.

Each event is logged on the `ollama_distributed.events` logger with the event's fields both as the message
(one JSON object, so a plain text log stays machine-readable) and as `extra={"event": {...}}` for handlers that
format records themselves (python-json-logger and the like read `record.event`).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

log = logging.getLogger("ollama_distributed.events")

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass(frozen=True)
class Event:
    """id: increasing from 1. time: wall-clock seconds. kind: short identifier. message: one readable sentence.
    model / node: what it concerns (None when not about one). level: debug|info|warning|error. data: JSON-ready
    details (plan id, predicted and measured times, ...)."""

    id: int
    time: float
    kind: str
    message: str
    level: str = "info"
    model: str | None = None
    node: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = dict(self.data)
        return out


class EventLog:
    """The most recent `capacity` events (oldest dropped), readable while others append."""

    def __init__(self, capacity: int = 500, clock: Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise ValueError(f"event log capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._events: deque[Event] = deque(maxlen=capacity)
        self._ids = itertools.count(1)
        self._counts: dict[str, int] = {}
        self._listeners: list[Callable[[Event], None]] = []

    def record(self, kind: str, message: str, *, level: str = "info", model: str | None = None,
               node: str | None = None, **data: Any) -> Event:
        """Append an event and log it. `data` must be JSON-serialisable (anything else is stringified)."""
        if not _KIND.match(kind):
            raise ValueError(f"event kind must match {_KIND.pattern}, got {kind!r}")
        if level not in LEVELS:
            raise ValueError(f"event level must be one of {', '.join(LEVELS)}, got {level!r}")
        clean = json.loads(json.dumps(data, default=str))
        with self._lock:
            ev = Event(next(self._ids), self._clock(), kind, message, level, model, node, clean)
            self._events.append(ev)
            self._counts[kind] = self._counts.get(kind, 0) + 1
            listeners = list(self._listeners)
        payload = ev.to_dict()
        log.log(LEVELS[level], json.dumps(payload, sort_keys=True), extra={"event": payload})
        for fn in listeners:
            try:
                fn(ev)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the decision it reports
                log.exception("event listener failed")
        return ev

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        """Call `fn(event)` after each record (e.g. to count events in metrics)."""
        with self._lock:
            self._listeners.append(fn)

    def recent(self, limit: int = 100, since_id: int = 0, kind: str | None = None,
               model: str | None = None) -> list[Event]:
        """Up to `limit` newest events with id > since_id (optionally of one kind / model), oldest first."""
        with self._lock:
            items = [e for e in self._events if e.id > since_id and (kind is None or e.kind == kind)
                     and (model is None or e.model == model)]
        return items[-limit:] if limit > 0 else []

    def counts(self) -> dict[str, int]:
        """Events recorded per kind since start (including those dropped from the window)."""
        with self._lock:
            return dict(self._counts)

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)
