"""Modelfile parsing: FROM, TEMPLATE, SYSTEM, PARAMETER, LICENSE, MESSAGE, ADAPTER.

Syntax as in ollama/ollama parser/parser.go and docs/modelfile.md: one instruction per line, instruction names are
case-insensitive, `#` starts a comment line, a value may be a bare rest-of-line, a "double quoted" string or a
\"\"\"triple quoted\"\"\" block spanning lines. `PARAMETER stop` may repeat (values accumulate into a list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Types of Ollama's Options/Runner fields (api/types.go), used to convert PARAMETER text values.
INT_PARAMS = frozenset(
    {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu", "main_gpu",
     "num_thread", "draft_num_predict"}
)
FLOAT_PARAMS = frozenset(
    {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty"}
)
BOOL_PARAMS = frozenset({"use_mmap", "numa", "use_mlock", "penalize_newline"})
LIST_PARAMS = frozenset({"stop"})
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


class ModelfileError(ValueError):
    """A Modelfile that cannot be parsed; the message names the line."""


@dataclass
class Modelfile:
    """The parsed instructions. `from_` is a model name or a file path, exactly as written."""

    from_: str = ""
    template: str | None = None
    system: str | None = None
    license: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


def convert_parameter(key: str, value: str) -> Any:
    """Convert one PARAMETER value to its option type; raises ModelfileError on a bad number or boolean."""
    try:
        if key in INT_PARAMS:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if key in FLOAT_PARAMS:
            return float(value)
    except ValueError:
        raise ModelfileError(f"PARAMETER {key}: {value!r} is not a valid number") from None
    if key in BOOL_PARAMS:
        low = value.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise ModelfileError(f"PARAMETER {key}: {value!r} is not a boolean")
    return value


def _read_value(lines: list[str], i: int, rest: str) -> tuple[str, int]:
    """Value starting at `rest` on line i; returns (value, index of the next line)."""
    stripped = rest.strip()
    if stripped.startswith('"""'):
        body = stripped[3:]
        if '"""' in body:
            return body[: body.index('"""')], i + 1
        collected = [body]
        j = i + 1
        while j < len(lines):
            if '"""' in lines[j]:
                collected.append(lines[j][: lines[j].index('"""')])
                return "\n".join(collected), j + 1
            collected.append(lines[j])
            j += 1
        raise ModelfileError(f'line {i + 1}: unterminated """ block')
    if len(stripped) >= 2 and stripped[0] == '"' and stripped[-1] == '"':
        return stripped[1:-1].replace('\\"', '"'), i + 1
    return stripped, i + 1


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text. Raises ModelfileError naming the offending line."""
    mf = Modelfile()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line or line.startswith("#"):
            i += 1
            continue
        head, _, rest = line.partition(" ")
        if "\t" in head:
            head, _, tail = head.partition("\t")
            rest = tail + " " + rest
        instruction = head.upper()
        lineno = i + 1
        value, i = _read_value(lines, i, lines[lineno - 1].strip()[len(head):])
        if instruction == "FROM":
            mf.from_ = value.strip()
        elif instruction == "TEMPLATE":
            mf.template = value
        elif instruction == "SYSTEM":
            mf.system = value
        elif instruction == "LICENSE":
            mf.license.append(value)
        elif instruction == "ADAPTER":
            mf.adapters.append(value.strip())
        elif instruction == "PARAMETER":
            key, _, raw = value.strip().partition(" ")
            if not key or not raw.strip():
                raise ModelfileError(f"line {lineno}: PARAMETER needs a name and a value")
            key = key.lower()
            raw_value, _ = _read_value([raw], 0, raw)
            converted = convert_parameter(key, raw_value)
            if key in LIST_PARAMS:
                mf.parameters.setdefault(key, []).append(converted)
            else:
                mf.parameters[key] = converted
        elif instruction == "MESSAGE":
            role, _, content = value.strip().partition(" ")
            if role.lower() not in MESSAGE_ROLES:
                raise ModelfileError(f"line {lineno}: MESSAGE role must be one of {', '.join(MESSAGE_ROLES)}")
            content, _ = _read_value([content], 0, content)
            mf.messages.append({"role": role.lower(), "content": content})
        else:
            raise ModelfileError(f"line {lineno}: unknown instruction {head!r}")
    if not mf.from_:
        raise ModelfileError("no FROM line: a Modelfile must name a base model or a GGUF file")
    return mf


def render_modelfile(from_: str, template: str | None, system: str | None, parameters: dict[str, Any],
                     license_texts: list[str] | None = None, messages: list[dict[str, Any]] | None = None) -> str:
    """Modelfile text as `/api/show` and `ollama show --modelfile` print it."""
    out = ["# Modelfile generated by \"ollama-distributed show\"", f"FROM {from_}"]
    if template:
        out.append(f'TEMPLATE """{template}"""')
    if system:
        out.append(f'SYSTEM """{system}"""')
    for key, value in parameters.items():
        for v in value if isinstance(value, list) else [value]:
            out.append(f"PARAMETER {key} {_param_text(v)}")
    for lic in license_texts or []:
        out.append(f'LICENSE """{lic}"""')
    for m in messages or []:
        out.append(f"MESSAGE {m.get('role', 'user')} {m.get('content', '')}")
    return "\n".join(out) + "\n"


def _param_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"' if (" " in v or not v) else v
    return str(v)


def parameters_text(parameters: dict[str, Any]) -> str:
    """`/api/show`'s `parameters` field: one `name value` line per value (Ollama pads the name to 30)."""
    lines = []
    for key, value in parameters.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {_param_text(v)}")
    return "\n".join(lines)
