"""A small subset of Go's text/template, enough for Ollama's classic prompt templates.

Ollama's older templates (and what users write in a Modelfile `TEMPLATE` or a request's `template`) look like
`{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>{{ .Response }}`.
Supported: `{{ .Name }}` fields, `{{ if X }} … {{ else if Y }} … {{ else }} … {{ end }}`, `{{- ` / ` -}}` trim
markers, `{{/* comments */}}`. Anything else (`range`, `.Messages`, functions) raises UnsupportedTemplateError,
and the caller falls back to the GGUF's own chat template.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_FIELD = re.compile(r"^\.[A-Za-z_][A-Za-z0-9_]*$")


class UnsupportedTemplateError(ValueError):
    """The template uses Go template features beyond the supported subset."""


def _tokens(template: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1) == "-":
            text = text.rstrip()
        if out and out[-1][0] == "trim-right":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        if m.group(3) == "-":
            out.append(("trim-right", ""))
        pos = m.end()
    tail = template[pos:]
    if out and out[-1][0] == "trim-right":
        out.pop()
        tail = tail.lstrip()
    out.append(("text", tail))
    return out


def _value(expr: str, data: dict[str, Any]) -> Any:
    if not _FIELD.match(expr):
        raise UnsupportedTemplateError(f"unsupported template expression {{{{ {expr} }}}}")
    return data.get(expr[1:], "")


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """Render with fields like {"System": ..., "Prompt": ..., "Response": ..., "Suffix": ...}."""
    tokens = _tokens(template)
    out: list[str] = []
    # Stack of (emitting?, some branch already taken?, parent emitting?)
    stack: list[tuple[bool, bool, bool]] = []
    emitting = True
    for kind, body in tokens:
        if kind == "text":
            if emitting:
                out.append(body)
            continue
        if body.startswith("/*"):
            continue
        words = body.split()
        head = words[0] if words else ""
        if head == "if":
            cond = emitting and bool(_value(" ".join(words[1:]), data))
            stack.append((cond, cond, emitting))
            emitting = cond
        elif head == "else":
            if not stack:
                raise UnsupportedTemplateError("{{ else }} without {{ if }}")
            _, taken, parent = stack[-1]
            if len(words) > 2 and words[1] == "if":
                cond = parent and not taken and bool(_value(" ".join(words[2:]), data))
            else:
                cond = parent and not taken
            stack[-1] = (cond, taken or cond, parent)
            emitting = cond
        elif head == "end":
            if not stack:
                raise UnsupportedTemplateError("{{ end }} without {{ if }}")
            _, _, emitting = stack.pop()
        elif len(words) == 1 and _FIELD.match(head):
            if emitting:
                out.append(str(_value(head, data)))
        else:
            raise UnsupportedTemplateError(f"unsupported template action {{{{ {body} }}}}")
    if stack:
        raise UnsupportedTemplateError("{{ if }} without {{ end }}")
    return "".join(out)


def is_supported(template: str) -> bool:
    """True when `render_go_template` can render this template."""
    try:
        render_go_template(template, {})
        return True
    except UnsupportedTemplateError:
        return False
