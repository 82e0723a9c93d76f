"""Parse and format the physical quantities a cluster description uses.

Decimal SI prefixes (k=1e3, M=1e6, G=1e9, T=1e12) as hardware vendors quote them; binary prefixes
(KiB, MiB, GiB, TiB) are 2**10 steps. Bits ("bit", "b" in a rate such as "Gbps") are 1/8 byte, so
"1Gbit/s" = 125e6 bytes/s. A bare number is already in base units (bytes, bytes/s, FLOP/s, seconds).
"""

from __future__ import annotations

import re

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BIN = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def _prefix(p: str, what: str, text: str) -> float:
    if p in _BIN:
        return _BIN[p]
    if p in _SI:
        return _SI[p]
    raise ValueError(f"unknown prefix {p!r} in {what} {text!r}")


def _number(value: object, what: str) -> tuple[float, str] | float:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number or a string with units, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what} must be >= 0, got {value}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a number or a string with units, got {value!r}")
    m = re.fullmatch(_NUM + r"(.*?)\s*", value)
    if not m:
        raise ValueError(f"cannot read {what} {value!r}: expected a number followed by a unit")
    if not m.group(2):
        return float(m.group(1))  # a bare number in a string: base units
    return float(m.group(1)), m.group(2)


def parse_bytes(value: object) -> int:
    """'8GB' -> 8e9, '16GiB' -> 16*2**30, '512MB', '1.5TB', 4096 -> 4096."""
    r = _number(value, "memory size")
    if isinstance(r, float):
        return int(r)
    x, unit = r
    m = re.fullmatch(r"(Ki|Mi|Gi|Ti|Pi|[kKMGTP]?)(B|bytes?)?", unit)
    if not m or (unit and not m.group(2) and not m.group(1)):
        raise ValueError(f"cannot read memory size {value!r}: unit {unit!r} is not one of B, kB, MB, GB, TB, KiB..TiB")
    return int(x * _prefix(m.group(1), "memory size", str(value)))


def parse_bandwidth(value: object) -> float:
    """Bytes per second: '100GB/s' -> 1e11, '1Gbit/s' / '1Gbps' / '1Gb/s' -> 1.25e8, '10GiB/s'."""
    r = _number(value, "bandwidth")
    if isinstance(r, float):
        return r
    x, unit = r
    m = re.fullmatch(r"(Ki|Mi|Gi|Ti|Pi|[kKMGTP]?)(B|bytes?|bit|bits|b)(/s|ps)", unit)
    if not m:
        raise ValueError(f"cannot read bandwidth {value!r}: expected units like GB/s, MB/s, Gbit/s, Gbps")
    scale = _prefix(m.group(1), "bandwidth", str(value))
    per_byte = 1.0 if m.group(2).startswith("B") or m.group(2).startswith("byte") else 1.0 / 8.0
    return x * scale * per_byte


def parse_flops(value: object) -> float:
    """FLOP/s: '2TFLOPS' -> 2e12, '500 GFLOP/s', '1.5e12'."""
    r = _number(value, "compute")
    if isinstance(r, float):
        return r
    x, unit = r
    m = re.fullmatch(r"([kKMGTP]?)(FLOPS|FLOP/s|flops|flop/s|FLOPs|FLOP/S)", unit)
    if not m:
        raise ValueError(f"cannot read compute {value!r}: expected units like TFLOPS, GFLOPS, FLOP/s")
    return x * _prefix(m.group(1), "compute", str(value))


def parse_duration(value: object) -> float:
    """Seconds: '0.2ms' -> 2e-4, '50us', '50µs', '1s', '3ns', 0.001 -> 0.001."""
    r = _number(value, "duration")
    if isinstance(r, float):
        return r
    x, unit = r
    scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}.get(unit)
    if scale is None:
        raise ValueError(f"cannot read duration {value!r}: expected units s, ms, us or ns")
    return x * scale


def format_bytes(n: float) -> str:
    """Human-readable decimal size, e.g. 9.1 GB (the same prefixes as parse_bytes)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
