"""How long a distributed step may take before its shards are checked for a hang (issue 6).

A shard whose process hangs without dying (stopped, deadlocked, a machine that stops answering without closing
its sockets) fails no Ray call: the step just never returns. A fixed time-out has to be as long as the longest
legitimate step (a long prefill on a slow node), so it detects a hang only after minutes. Instead the executor
waits for each step until an *adaptive* deadline

    deadline(n) = max(floor_s, factor × expected(n)),      n = tokens in the step,

where expected(n) is the EMA of measured step times of steps of n's size class (sizes rounded up to a power of
two), extrapolated linearly in n from the nearest smaller measured class when n's has not been seen (per-token
cost falls with the step size on every backend we measured, so linear extrapolation over-estimates: safe).
At the deadline the shards still busy are *probed* (a liveness call served by a separate thread of the actor,
see worker.py `ping`): a shard that does not answer within `probe_s` is hung and the step fails naming it; when
every busy shard answers, the step is merely slow, and it gets another deadline, up to `ceiling_s` in all.
So a hang is found in about floor_s + probe_s during decode (3.5 s with the defaults), and a long prefill is
never cut off while its shards are alive: the deadline only decides when to probe, and probing a live shard costs
one Ray call. probe_s is what guards against false alarms: a live shard must fail to answer for that long.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class StepTimeout:
    """Step time-out policy of the Ray executor (see module docstring).

    floor_s: shortest deadline before busy shards are probed (and the whole deadline before anything was
      measured). factor: deadline as a multiple of the expected step time. probe_s: how long a busy shard may
      take to answer a liveness probe before it is declared hung. ceiling_s: longest a step may take in all,
      even when every shard keeps answering (None: the executor's `timeout_s`). alpha: EMA weight of a new
      measurement.
    """

    floor_s: float = 2.0
    factor: float = 10.0
    probe_s: float = 1.5
    ceiling_s: float | None = None
    alpha: float = 0.2

    def __post_init__(self) -> None:
        for name in ("floor_s", "probe_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"StepTimeout.{name} must be > 0, got {getattr(self, name)}")
        if self.factor < 1:
            raise ValueError(f"StepTimeout.factor must be >= 1, got {self.factor}")
        if self.ceiling_s is not None and self.ceiling_s < self.floor_s:
            raise ValueError(f"StepTimeout.ceiling_s ({self.ceiling_s}) must be >= floor_s ({self.floor_s})")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"StepTimeout.alpha must be in (0, 1], got {self.alpha}")


def size_class(tokens: int) -> int:
    """Steps are grouped by their token count rounded up to a power of two: 1, 2, 4, ..."""
    if tokens < 1:
        raise ValueError(f"a step has at least one token, got {tokens}")
    return 1 << (tokens - 1).bit_length()


class StepTimer:
    """EMA of measured step seconds per size class, and the deadline it implies (thread-safe)."""

    def __init__(self, policy: StepTimeout = StepTimeout()) -> None:
        self.policy = policy
        self._ema: dict[int, float] = {}
        self._lock = threading.Lock()

    def record(self, tokens: int, seconds: float) -> None:
        """Fold one successful step of `tokens` tokens that took `seconds`."""
        if seconds < 0 or not math.isfinite(seconds):
            return
        c = size_class(tokens)
        a = self.policy.alpha
        with self._lock:
            old = self._ema.get(c)
            self._ema[c] = seconds if old is None else (1 - a) * old + a * seconds

    def expected(self, tokens: int) -> float | None:
        """Expected seconds of a step of `tokens` tokens; None before any step was measured."""
        c = size_class(tokens)
        with self._lock:
            if c in self._ema:
                return self._ema[c]
            smaller = [k for k in self._ema if k < c]
            if smaller:
                k = max(smaller)
                return self._ema[k] * c / k
            larger = [k for k in self._ema if k > c]
            return self._ema[min(larger)] if larger else None

    def deadline(self, tokens: int) -> float:
        """Seconds to wait for a step of `tokens` tokens before probing its busy shards."""
        exp = self.expected(tokens)
        p = self.policy
        return p.floor_s if exp is None else max(p.floor_s, p.factor * exp)

    def to_dict(self) -> dict[str, float]:
        with self._lock:
            return {str(k): v for k, v in sorted(self._ema.items())}
