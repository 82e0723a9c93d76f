"""Chat templates: a model's Jinja template rendered the way HF `tokenizer.apply_chat_template` renders it.

The template comes from GGUF `tokenizer.chat_template` (or an HF tokenizer_config.json / chat_template.jinja).
Templates are untrusted code from model files, so they run in jinja2's ImmutableSandboxedEnvironment. The
environment matches transformers' (utils/chat_template_utils.py) so a rendered prompt is byte-identical:
trim_blocks + lstrip_blocks, the loopcontrols extension, a `{% generation %}` block tag (rendered as its body),
a JSON `tojson` filter that does not HTML-escape, and the globals `raise_exception(msg)` and
`strftime_now(fmt)`. Variables: messages, add_generation_prompt, tools, documents, bos_token, eos_token (+ any
keyword the caller passes, e.g. `enable_thinking`, `date_string`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

# Used when a model ships no template (plain ChatML, the format of SmolLM2/Qwen2 and many fine-tunes).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (Gemma 3 model card / its tokenizer_config.json): "<start_of_turn>user|model\n...<end_of_turn>\n",
# a system message folded into the first user turn, BOS first. Used for gemma2/3 files that ship no template (the
# 270M GGUF has none; Ollama gets it from the registry's Modelfile instead).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if ns.system %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
FAMILY_TEMPLATES = {"gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def family_template(meta: Mapping[str, Any]) -> str | None:
    """The file's `tokenizer.chat_template`, else its family's known format (FAMILY_TEMPLATES), else None."""
    return meta.get("tokenizer.chat_template") or FAMILY_TEMPLATES.get(str(meta.get("general.architecture", "")))


# Older names for a message's reasoning text; transformers copies them to `reasoning_content` (the standard
# one) and `thinking` (read by gpt-oss templates) before rendering.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template does not compile, or it refused the conversation (its `raise_exception`), or bad input."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text (for HF's training masks); renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names (no route to CPython internals from a template)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes (<, >, &, '); chat prompts need the JSON verbatim.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    return env


def _plain(value: Any) -> Any:
    """Copy of caller data made of plain JSON types only: the sandbox cannot see methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models (API request bodies)
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(_plain(list(messages))):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        # APIs send content=None / tool_calls=None; templates handle a missing key but print "None" for None.
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class ChatTemplate:
    """One model's chat template. `render(messages)` → the prompt text (tokenize it with parse-special on)."""

    def __init__(self, template_str: str | None, bos_token: str = "", eos_token: str = "",
                 **special_tokens: str) -> None:
        """template_str None/empty → CHATML_TEMPLATE. special_tokens: e.g. unk_token, pad_token (template vars)."""
        self.is_fallback = not template_str
        self.source = template_str or CHATML_TEMPLATE
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._vars = {"bos_token": bos_token, "eos_token": eos_token,
                      **{k: v for k, v in special_tokens.items() if v is not None}}
        env = _environment()
        try:
            ast = env.parse(self.source)
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not compile: line {exc.lineno}: {exc.message}") from None
        self.variables = frozenset(jinja2.meta.find_undeclared_variables(ast))

    @property
    def supports_tools(self) -> bool:
        """True when the template reads `tools` (so tool definitions reach the prompt)."""
        return "tools" in self.variables

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
               **kwargs: Any) -> str:
        """The prompt for `messages` ([{"role": ..., "content": ...}, ...]), like HF apply_chat_template(
        tokenize=False). tools: JSON-schema tool definitions (OpenAI format); documents: [{"title", "text"}].
        Raises ChatTemplateError when the template rejects the conversation (e.g. roles not alternating)."""
        if tools is not None and any(not isinstance(t, Mapping) for t in tools):
            raise ChatTemplateError("tools must be JSON-schema dicts")
        if documents is not None and any(not isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError("documents must be dicts with 'title' and 'text' keys")
        context = {**self._vars, **_plain(kwargs)}
        try:
            return self._template.render(
                messages=_normalize_messages(messages), tools=_plain(tools), documents=_plain(documents),
                add_generation_prompt=add_generation_prompt, **context,
            )
        except jinja2.exceptions.TemplateError as exc:  # includes raise_exception and sandbox SecurityError
            raise ChatTemplateError(f"chat template rejected the conversation: {exc}") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
            raise ChatTemplateError(f"chat template failed on this conversation: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "ChatTemplate":
        """From GGUF key/values: `tokenizer.chat_template` and the bos/eos/unk/pad token texts."""
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def text(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        template = family_template(meta)
        if not template:
            log.info("model has no chat template; using ChatML")
        return cls(template, text("bos_token_id") or "", text("eos_token_id") or "",
                   unk_token=text("unknown_token_id"), pad_token=text("padding_token_id"))

    @classmethod
    def from_gguf(cls, path: str | Path) -> "ChatTemplate":
        from .weights import read_metadata  # GGUF reading and its typed errors live there

        return cls.from_metadata(read_metadata(path))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatTemplate":
        """From a `model.tokenizer.Tokenizer` (works for GGUF and HF directories alike)."""
        return cls(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)

    def __repr__(self) -> str:
        return f"ChatTemplate(fallback={self.is_fallback}, supports_tools={self.supports_tools})"
