"""Request handling shared by the Ollama and OpenAI APIs: prompts, submission, tool calls, embeddings.

Prompt construction follows Ollama's server (server/prompt.go, routes.go): /api/generate renders the model's
template with the request's (or the Modelfile's) system prompt and the user prompt unless `raw`; /api/chat renders
the whole conversation with the chat template (the GGUF's `tokenizer.chat_template`, rendered as HF does), with
the Modelfile's MESSAGEs and SYSTEM prepended when the conversation has none. A Modelfile/request TEMPLATE in
Ollama's classic Go-template form is honoured when it stays within the supported subset (gotemplate.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import secrets
import string
from typing import Any, Sequence

from ..model.options import GenerationOptions
from ..runtime.requests import GenerationRequest, RequestHandle
from .gotemplate import UnsupportedTemplateError, render_go_template
from .grammar import GrammarConstraint, ToolCallConstraint, compile_format
from .models import ModelView

log = logging.getLogger(__name__)


class UnsupportedRequestError(ValueError):
    """The request asks for something this model or server cannot do (HTTP 400)."""


def supports_tools(view: ModelView) -> bool:
    t = view.runner.chat_template
    return bool(t is not None and getattr(t, "supports_tools", False))


def capabilities(view_or_template: Any) -> list[str]:
    """Ollama capabilities (types/model/capability.go): completion always; tools when the chat template takes
    them; insert when the template uses a suffix. No vision/thinking models are supported yet."""
    template = getattr(getattr(view_or_template, "runner", None), "chat_template", view_or_template)
    caps = ["completion"]
    if template is not None and getattr(template, "supports_tools", False):
        caps.append("tools")
    return caps


def _render_chat_template(view: ModelView, messages: list[dict[str, Any]], tools: list[dict] | None) -> str:
    template = view.runner.chat_template
    if template is None:
        # No template in the file: a plain transcript the model can continue.
        lines = [f"{m['role']}: {m.get('content', '')}" for m in messages]
        return "\n".join(lines) + "\nassistant:"
    return template.render(messages, add_generation_prompt=True, tools=tools or None)


def _go_template(view: ModelView, override: str | None) -> str | None:
    tpl = override or view.template
    if not tpl:
        return None
    try:
        render_go_template(tpl, {})
        return tpl
    except UnsupportedTemplateError as exc:
        if override:
            raise UnsupportedRequestError(f"template: {exc}") from None
        log.debug("model %s: TEMPLATE not in the supported Go subset (%s); using the GGUF chat template",
                  view.name, exc)
        return None


def generate_prompt(view: ModelView, prompt: str, system: str | None, template: str | None,
                    suffix: str | None) -> str:
    """The text /api/generate feeds the model (not raw)."""
    system = system if system is not None else view.system
    tpl = _go_template(view, template)
    if tpl is not None:
        return render_go_template(tpl, {"System": system or "", "Prompt": prompt, "Response": "",
                                        "Suffix": suffix or ""})
    if suffix:
        raise UnsupportedRequestError(f"'{view.name}' does not support insert (suffix)")
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return _render_chat_template(view, messages, None)


def chat_prompt(view: ModelView, messages: list[dict[str, Any]], tools: list[dict] | None) -> str:
    """The text /api/chat feeds the model."""
    msgs = list(view.messages) + list(messages)
    if view.system and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": view.system})
    tpl = _go_template(view, None)
    if tpl is not None and not tools:
        # Ollama's classic templates render one exchange at a time (.System/.Prompt/.Response).
        out, system, pending = [], "", None
        for m in msgs:
            if m["role"] == "system":
                system = m.get("content", "")
            elif m["role"] == "user":
                pending = m.get("content", "")
            elif m["role"] == "assistant":
                out.append(render_go_template(tpl, {"System": system, "Prompt": pending or "",
                                                    "Response": m.get("content", "")}))
                system, pending = "", None
        out.append(render_go_template(tpl, {"System": system, "Prompt": pending or "", "Response": ""}))
        return "".join(out)
    return _render_chat_template(view, [_template_message(m) for m in msgs], tools)


def _template_message(m: dict[str, Any]) -> dict[str, Any]:
    """Ollama message → the dict HF chat templates expect (tool calls as {"type":"function","function":…})."""
    out = {k: v for k, v in m.items() if v is not None and k != "images"}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", **tc} if "function" in tc else tc for tc in m["tool_calls"]]
    if m.get("tool_name") and "name" not in out:
        out["name"] = m["tool_name"]
    return out


def encode_prompt(view: ModelView, text: str, context: Sequence[int] | None = None) -> list[int]:
    """Token ids for a rendered prompt; a template that already starts with BOS does not get a second one."""
    tok = view.runner.tokenizer
    ids = list(tok.encode(text))
    bos = getattr(tok, "bos_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if context:
        vocab = view.runner.executor.config.vocab_size
        bad = [t for t in context if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise UnsupportedRequestError(f"context holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        ids = list(context) + ids
    return ids


def submit(view: ModelView, ids: list[int], options: GenerationOptions, fmt: Any, truncate: bool = True,
           request_id: str | None = None, *, top_logprobs: int | None = None,
           grammar: str | None = None, tool_grammar: str | None = None) -> RequestHandle:
    """Queue a generation. `fmt` ("json" or a JSON schema, already checked by `grammar.normalize_format`) or an
    explicit llguidance `grammar` (tool calls) constrains it: the constraint travels with the request's sampler,
    with the request's token budget (num_predict / context left) so the JSON is closed before it runs out.
    `tool_grammar` (no format): the answer may be prose, but one that opens an object must be a valid tool call.
    top_logprobs: None, or N >= 0 to get each token's logprob and N alternatives in the chunks.
    Raises QueueFullError (503), ContextLengthError (400), ValueError (empty prompt), SchemaError (400)."""
    runner = view.runner
    engine = runner.engine
    constraint = None
    if grammar is None and fmt is not None:
        grammar = _compiled(fmt)
    if grammar is not None or tool_grammar is not None:
        num_ctx = min(options.num_ctx, engine.context_limit)
        budget = max(1, num_ctx - min(len(ids), num_ctx))
        if options.num_predict >= 0:
            budget = min(budget, options.num_predict)
        if grammar is not None:
            constraint = GrammarConstraint(grammar, runner.tokenizer, budget)
        else:
            constraint = ToolCallConstraint(tool_grammar, runner.tokenizer, budget)
    req = GenerationRequest(prompt_ids=ids, options=options, request_id=request_id, truncate=truncate,
                            constraint=constraint, top_logprobs=top_logprobs)
    handle = engine.submit(req)
    if runner.learning is not None:
        # Time-to-first-token / inter-token metrics as it streams, and a measurement report when it ends.
        handle = runner.learning.track(runner.name, handle, batch_fn=lambda: engine.stats()["running"],
                                       stages_fn=lambda: _decode_stage_ms(runner.executor))
    return handle


@functools.lru_cache(maxsize=256)
def _compiled_text(fmt_json: str) -> str:
    return compile_format(json.loads(fmt_json))


def _compiled(fmt: Any) -> str:
    """The grammar of a format, compiled once per distinct schema (a client repeats its schema every call)."""
    return _compiled_text(json.dumps(fmt, sort_keys=True))


def _decode_stage_ms(executor: Any) -> tuple[float, ...] | None:
    """The Ray executor's measured per-stage decode step times, through the JSON/replica wrappers (None for an
    in-process executor, which has one stage and nothing to attribute)."""
    inner = getattr(executor, "inner", executor)
    fn = getattr(inner, "decode_stage_ms", None)
    return fn() if callable(fn) else None


_ID_ALPHABET = string.ascii_lowercase + string.digits


def tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


_TOOL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def looks_like_tool_call(text: str) -> bool:
    """Could this (partial) output be the start of a tool call? Used to hold back streamed text."""
    s = text.lstrip()
    return not s or s[0] in "{[" or "<tool_call>".startswith(s[:11]) or s.startswith(("<tool_call>", "[TOOL_CALLS]"))


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """Tool calls in a model's output, Ollama-style (server/model.go parseToolCalls): JSON objects with a name and
    arguments/parameters, alone, in a list, or inside <tool_call> tags (Hermes/Qwen) or after [TOOL_CALLS]
    (Mistral). Returns Ollama `tool_calls` (arguments as an object) or None when the text is not a tool call."""
    s = text.strip()
    if s.startswith("[TOOL_CALLS]"):
        s = s[len("[TOOL_CALLS]"):].strip()
    candidates: list[Any] = []
    tagged = _TOOL_TAG.findall(s)
    try:
        if tagged:
            candidates = [json.loads(t) for t in tagged]
        elif s[:1] in "{[":
            parsed = json.loads(s)
            candidates = parsed if isinstance(parsed, list) else [parsed]
    except ValueError:
        return None
    calls = []
    for i, c in enumerate(candidates):
        if not isinstance(c, dict):
            return None
        fn = c.get("function") if isinstance(c.get("function"), dict) else c
        name = fn.get("name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(name, str) or not isinstance(args, dict):
            return None
        calls.append({"id": tool_call_id(), "function": {"index": i, "name": name, "arguments": args}})
    return calls or None


def l2_normalize(vec: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec] if norm > 0 else list(vec)


async def embed_texts(view: ModelView, texts: list[str], truncate: bool, options: GenerationOptions,
                      normalize: bool = True, dimensions: int | None = None) -> tuple[list[list[float]], int]:
    """Embeddings of each text (mean-pooled final hidden states), L2-normalised when asked; `dimensions`
    truncates then re-normalises (Ollama EmbedHandler). Returns (vectors, total prompt tokens)."""
    engine = view.runner.engine
    hidden = view.runner.executor.config.hidden_size
    if dimensions is not None and not 1 <= dimensions <= hidden:
        raise UnsupportedRequestError(f"dimensions must be between 1 and {hidden}, got {dimensions}")
    vectors: list[list[float]] = []
    total = 0
    for text in texts:
        result = await asyncio.to_thread(engine.embedding, text, truncate=truncate, num_ctx=options.num_ctx)
        vec = result.vector
        if normalize:
            vec = l2_normalize(vec)
        if dimensions is not None:
            vec = l2_normalize(vec[:dimensions])
        vectors.append(vec)
        total += result.prompt_eval_count
    return vectors, total
