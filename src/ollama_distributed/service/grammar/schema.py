"""Request formats → llguidance grammars, checked before anything is queued.

`format` (Ollama) is "json", a JSON-schema object, or ""/null; OpenAI's `response_format` maps onto the same
(`json_object` → "json", `json_schema` → its `schema`). "json" means any JSON object (llama.cpp's json.gbnf root,
which Ollama uses). A schema is first checked against the JSON-Schema 2020-12 meta-schema (`jsonschema`), so
`{"type": "nonsense-type"}` is refused with the validator's message; then llguidance compiles it and refuses what
it does not implement, with its message. Both become SchemaError, which the APIs answer with 400.

Output is compact (llguidance `whitespace_flexible: false`): no whitespace between tokens of the JSON, which
bounds the answer and keeps a small model from drifting into endless blank runs.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import jsonschema
import llguidance

log = logging.getLogger(__name__)

_OPTIONS = {"whitespace_flexible": False}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class SchemaError(ValueError):
    """The format or schema is malformed or uses what the grammar engine cannot enforce (HTTP 400)."""


def normalize_format(fmt: Any) -> str | dict | None:
    """The request's `format`: "json", a JSON-schema object, or None. Raises SchemaError otherwise (Ollama's
    `invalid format`), also for a schema that cannot be enforced (compiled once here, then cached by the caller)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return "json"
    if isinstance(fmt, dict):
        compile_format(fmt)
        return fmt
    raise SchemaError(f'invalid format: {fmt!r}: expected "json" or a JSON schema object')


def compile_format(fmt: str | dict) -> str:
    """llguidance grammar (its JSON text) for "json" or a JSON schema. Raises SchemaError."""
    schema = ANY_OBJECT if fmt == "json" else fmt
    if not isinstance(schema, dict):
        raise SchemaError(f'invalid format: {fmt!r}: expected "json" or a JSON schema object')
    return _compile_schema(schema, "format")


def compile_tool_calls(tools: list[dict[str, Any]], only: str | None = None) -> str:
    """Grammar for one tool call written as a JSON object {"name": NAME, "arguments": {...}} (the shape
    `service.generation.parse_tool_calls` reads), over every tool or just the one named `only`."""
    choices = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise SchemaError(f"tools[{i}]: expected {{type: function, function: {{name, parameters}}}}")
        if only is not None and fn["name"] != only:
            continue
        params = fn.get("parameters") or {"type": "object"}
        choices.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not choices:
        raise SchemaError(f"tool_choice names {only!r}, which is not among the tools")
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    return _compile_schema(schema, "tools")


def tool_call_grammar(tools: Any) -> str | None:
    """The tool-call grammar for optional tool use, or None when the tools' schemas cannot be compiled (then the
    answer stays free and is only parsed, as before: a client's odd schema must not make a request fail)."""
    if not tools or not isinstance(tools, list):
        return None
    try:
        return _cached_tool_grammar(json.dumps(tools, sort_keys=True))
    except SchemaError as exc:
        log.info("tool calls left unconstrained: %s", exc)
        return None


@functools.lru_cache(maxsize=128)
def _cached_tool_grammar(tools_json: str) -> str:
    # clients send the same tool list with every turn of a conversation
    return compile_tool_calls(json.loads(tools_json))


def _compile_schema(schema: dict[str, Any], what: str) -> str:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise SchemaError(f"invalid JSON schema in {what}{' at ' + where if where else ''}: {exc.message}") from None
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_OPTIONS)
    except ValueError as exc:
        raise SchemaError(f"invalid JSON schema in {what}: {exc}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise SchemaError(f"unsupported JSON schema in {what}: {messages[0] if messages else 'rejected'}")
    return grammar
