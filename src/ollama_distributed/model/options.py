"""Generation options with Ollama's names, types and defaults.

Source of the names/defaults: ollama/ollama `api/types.go` (`Options`, `Runner`, `DefaultOptions`, `FromMap`).
Behaviour copied from `FromMap` (facts, not code):
  - unknown keys are ignored (clients send `numa`, `mirostat`, `tfs_z`, `penalize_newline`, ...); we log them;
  - a value of the wrong JSON type is an error naming the option; integer options accept a float that is a whole
    number (JSON clients often send 40.0).
Layering (Ollama `server/images.go` + `routes.go`): built-in defaults < server settings (e.g. OLLAMA_CONTEXT_LENGTH,
read at the edge and passed in as `base`) < Modelfile `PARAMETER`s < request `options`.

`num_ctx` is a per-request upper bound here; the engine also clamps it to the model's trained context and the
executor's cache size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

log = logging.getLogger(__name__)

DEFAULT_NUM_CTX = 4096


class InvalidOptionError(ValueError):
    """An option has the wrong type or an impossible value; the message names the option."""


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling and runner options of one request (Ollama's `Options`).

    Sampling (llama.cpp semantics):
      num_keep: prompt tokens kept from the start when a too-long prompt is truncated (-1 = as many as possible).
      seed: RNG seed; negative = random (Ollama's default -1).
      num_predict: max tokens to generate; -1 = unlimited, -2 = until the context is full (both bounded by num_ctx).
      top_k: keep the k most likely tokens (<= 0 disables).
      top_p: nucleus sampling, keep the smallest set with cumulative probability >= top_p (>= 1 disables).
      min_p: drop tokens with probability < min_p * p_max (<= 0 disables).
      typical_p: locally typical sampling (Meister et al. 2022) (>= 1 disables).
      repeat_last_n: how many recent tokens the penalties look at (0 disables, -1 = num_ctx).
      temperature: softmax temperature; <= 0 is greedy (argmax).
      repeat_penalty: CTRL-style multiplicative penalty (1.0 disables).
      presence_penalty, frequency_penalty: OpenAI-style additive penalties (0 disables).
      stop: stop strings; generation ends before the first occurrence, which is not returned.
    Runner:
      num_ctx: context window in tokens (prompt + generated), >= 1.
      num_batch: prompt tokens fed per step (chunked prefill), >= 1.
      num_gpu, main_gpu, use_mmap, num_thread: accepted for compatibility (num_thread 0 = auto).
      draft_num_predict: accepted (speculative decoding is not implemented).
    """

    num_keep: int = 4
    seed: int = -1
    num_predict: int = -1
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64
    temperature: float = 0.8
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    num_ctx: int = DEFAULT_NUM_CTX
    num_batch: int = 512
    num_gpu: int = -1
    main_gpu: int = 0
    use_mmap: bool | None = None
    num_thread: int = 0
    draft_num_predict: int = 0

    def __post_init__(self) -> None:
        # Normalise `stop` so that a list passed to the constructor still gives a hashable, frozen value.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        for name, ftype in _FIELD_TYPES.items():
            value = getattr(self, name)
            if ftype is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise InvalidOptionError(f"option {name!r} must be a finite number, got {value}")
        if self.num_ctx < 1:
            raise InvalidOptionError(f"option 'num_ctx' must be >= 1, got {self.num_ctx}")
        if self.num_batch < 1:
            raise InvalidOptionError(f"option 'num_batch' must be >= 1, got {self.num_batch}")
        if self.num_predict < -2:
            raise InvalidOptionError(
                f"option 'num_predict' must be -1 (unlimited), -2 (fill context) or >= 0, got {self.num_predict}"
            )
        if self.repeat_last_n < -1:
            raise InvalidOptionError(
                f"option 'repeat_last_n' must be -1 (num_ctx), 0 (off) or > 0, got {self.repeat_last_n}"
            )
        if self.num_keep < -1:
            raise InvalidOptionError(f"option 'num_keep' must be >= -1, got {self.num_keep}")
        if self.num_thread < 0:
            raise InvalidOptionError(f"option 'num_thread' must be >= 0, got {self.num_thread}")
        if self.repeat_penalty < 0:
            raise InvalidOptionError(f"option 'repeat_penalty' must be >= 0, got {self.repeat_penalty}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str):
                raise InvalidOptionError(f"option 'stop' must be an array of strings, item {i} is {s!r}")

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, base: "GenerationOptions | None" = None) -> "GenerationOptions":
        """Options from a JSON object (a request's `options`), layered over `base` (default: Ollama's defaults).

        Unknown keys are ignored; `None` values mean "not set" (keep the base value).
        Raises InvalidOptionError for a wrong type or an impossible value.
        """
        base = base if base is not None else cls()
        if d is None:
            return base
        if not isinstance(d, Mapping):
            raise InvalidOptionError(f"options must be an object, got {type(d).__name__}")
        updates: dict[str, Any] = {}
        for key, value in d.items():
            ftype = _FIELD_TYPES.get(key)
            if ftype is None:
                log.info("ignoring unknown option %r", key)
                continue
            if value is None:
                continue
            updates[key] = _coerce(key, ftype, value)
        return replace(base, **updates) if updates else base

    @classmethod
    def from_modelfile(
        cls, params: Mapping[str, Any], base: "GenerationOptions | None" = None
    ) -> "GenerationOptions":
        """Options from Modelfile `PARAMETER` lines (values are strings, or lists of strings for repeats).

        Mirrors Ollama's `api.FormatParams`: each value is parsed by the option's type; `stop` may repeat and
        accumulates. Typed values (as stored in a model's params JSON blob) are accepted too.
        """
        base = base if base is not None else cls()
        updates: dict[str, Any] = {}
        for key, raw in params.items():
            ftype = _FIELD_TYPES.get(key)
            if ftype is None:
                log.info("ignoring unknown Modelfile parameter %r", key)
                continue
            values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
            if ftype is tuple:
                updates[key] = tuple(str(v) for v in values)
                continue
            if not values:
                continue
            value = values[-1]
            updates[key] = _parse_string(key, ftype, value) if isinstance(value, str) else _coerce(key, ftype, value)
        return replace(base, **updates) if updates else base

    def merged(self, d: Mapping[str, Any] | None) -> "GenerationOptions":
        """These options overridden by a request's `options` object (same rules as `from_dict`)."""
        return GenerationOptions.from_dict(d, base=self)

    def to_dict(self, only_changed: bool = False) -> dict[str, Any]:
        """JSON-ready dict (stop as a list). With only_changed, only fields that differ from Ollama's defaults."""
        out = asdict(self)
        out["stop"] = list(self.stop)
        if only_changed:
            default = asdict(GenerationOptions())
            default["stop"] = []
            out = {k: v for k, v in out.items() if v != default[k]}
        return out

    # ---- derived values the engine uses -------------------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        """temperature <= 0 means argmax (llama.cpp `llama_sampler_temp`: t <= 0 keeps only the max logit)."""
        return self.temperature <= 0.0

    def penalty_window(self, num_ctx: int) -> int:
        """Number of recent tokens the repetition penalties consider (repeat_last_n -1 = the whole context)."""
        return num_ctx if self.repeat_last_n == -1 else self.repeat_last_n


_FIELD_TYPES: dict[str, type] = {}
for _f in fields(GenerationOptions):
    _t = str(_f.type)
    if _t.startswith("tuple"):
        _FIELD_TYPES[_f.name] = tuple
    elif _t.startswith("bool"):
        _FIELD_TYPES[_f.name] = bool
    elif _t == "int":
        _FIELD_TYPES[_f.name] = int
    elif _t == "float":
        _FIELD_TYPES[_f.name] = float
    else:  # pragma: no cover - a new field with an unhandled type is a programming error
        raise TypeError(f"GenerationOptions.{_f.name}: unhandled type {_t}")

OPTION_NAMES: frozenset[str] = frozenset(_FIELD_TYPES)


def _coerce(key: str, ftype: type, value: Any) -> Any:
    """Check one JSON value against the option's type (Ollama `FromMap` rules)."""
    if ftype is int:
        # bool is an int subclass in Python, but `true` is not a number in JSON.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidOptionError(f"option {key!r} must be of type integer, got {value!r}")
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise InvalidOptionError(f"option {key!r} must be a whole number, got {value!r}")
            value = int(value)
        return value
    if ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidOptionError(f"option {key!r} must be of type float, got {value!r}")
        return float(value)
    if ftype is bool:
        if not isinstance(value, bool):
            raise InvalidOptionError(f"option {key!r} must be of type boolean, got {value!r}")
        return value
    # `stop`: an array of strings; a single string is accepted (the OpenAI API allows it).
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise InvalidOptionError(f"option {key!r} must be of type array of strings, got {value!r}")
    return tuple(value)


def _parse_string(key: str, ftype: type, value: str) -> Any:
    """Parse a Modelfile PARAMETER value (always text) by the option's type."""
    text = value.strip()
    try:
        if ftype is int:
            return _coerce(key, int, float(text) if "." in text or "e" in text.lower() else int(text))
        if ftype is float:
            return float(text)
        if ftype is bool:
            lowered = text.lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
            raise ValueError(text)
    except ValueError:
        raise InvalidOptionError(f"parameter {key!r}: cannot parse {value!r} as {ftype.__name__}") from None
    return (value,)
