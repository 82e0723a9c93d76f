"""OpenAI-compatible endpoints (ollama openai/openai.go + middleware/openai.go; checklist §13):
/v1/chat/completions, /v1/completions, /v1/models, /v1/models/{id}, /v1/embeddings.

Requests are translated to the same service calls as the Ollama API; errors come out OpenAI-shaped (errors.py).
Streams are SSE: `data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..service import generation as gen
from ..service.grammar import SchemaError, compile_tool_calls, tool_call_grammar
from ..service.store import ModelEntry
from .common import AppState, resolve_model, state, unless_disconnected
from .errors import APIError, read_json, status_and_message
from .logprobs import openai_chat_logprobs, openai_completion_logprobs
from .ollama import check_common

router = APIRouter()

_counter = iter(range(1, 1 << 62))


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields → Ollama options (openai.go fromChatRequest: temperature and top_p default 1.0)."""
    opts: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0}
    mapping = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "frequency_penalty":
               "frequency_penalty", "presence_penalty": "presence_penalty"}
    for src, dst in mapping.items():
        if body.get(src) is not None:
            opts[dst] = body[src]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        opts["num_predict"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        opts["stop"] = [stop] if isinstance(stop, str) else stop
    return opts


def _format(body: dict[str, Any]) -> Any:
    rf = body.get("response_format")
    if not rf:
        return None
    if not isinstance(rf, dict):
        raise APIError(400, "invalid response_format: expected an object")
    kind = rf.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "invalid response_format: json_schema must be an object with a 'schema'")
        schema = spec.get("schema")
        if schema is None:
            return "json"
        if not isinstance(schema, dict):
            raise APIError(400, "invalid response_format: json_schema.schema must be a JSON schema object")
        return schema
    if kind in (None, "text"):
        return None
    raise APIError(400, f"invalid response_format type {kind!r}")


def _messages(raw: Any) -> tuple[list[dict[str, Any]], bool]:
    """OpenAI messages → Ollama messages; returns (messages, has_images)."""
    if not isinstance(raw, list):
        raise APIError(400, "invalid value for 'messages': expected an array")
    if not raw:
        raise APIError(400, "[] is too short - 'messages'")
    out, images = [], False
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"invalid message at index {i}: expected an object with a role")
        content = m.get("content")
        text = ""
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise APIError(400, f"invalid message content part in message {i}")
                if part.get("type") == "text":
                    text += str(part.get("text", ""))
                elif part.get("type") == "image_url":
                    url = part.get("image_url", {})
                    url = url.get("url", "") if isinstance(url, dict) else str(url)
                    if not url.startswith("data:"):
                        raise APIError(400, "image URLs are not supported: send the image as a base64 data URI")
                    images = True
                else:
                    raise APIError(400, f"invalid message content part type {part.get('type')!r}")
        elif content is not None:
            raise APIError(400, f"invalid content in message {i}: expected a string or an array of parts")
        msg: dict[str, Any] = {"role": m["role"].lower(), "content": text}
        if m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = dict(tc.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                    except ValueError:
                        raise APIError(400, f"tool call arguments in message {i} are not valid JSON") from None
                calls.append({"id": tc.get("id"), "function": fn})
            msg["tool_calls"] = calls
        if m.get("name") and msg["role"] == "tool":
            msg["tool_name"] = m["name"]
        if m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out, images


def _openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": c["id"], "index": c["function"]["index"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
            for c in calls]


def _top_logprobs(body: dict[str, Any], kind: str) -> int | None:
    """How many alternatives per token to report (None: no logprobs). Chat: `logprobs: true` with
    `top_logprobs` 0-20; completions: `logprobs: N` (an integer)."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if kind == "completion":
        if lp is None:
            return None
        if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 20:
            raise APIError(400, f"invalid logprobs {lp!r}: expected an integer between 0 and 20")
        return lp
    if lp not in (None, True, False):
        raise APIError(400, f"invalid logprobs {lp!r}: expected a boolean")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise APIError(400, f"invalid top_logprobs {top!r}: expected an integer between 0 and 20")
    if top is not None and not lp:
        raise APIError(400, "top_logprobs requires logprobs to be true")
    return (top or 0) if lp else None


def _tool_grammar(body: dict[str, Any], tools: Any) -> tuple[str | None, str | None]:
    """(strict grammar, lazy tool-call grammar). `tool_choice: "required"` or a named function: the answer is
    one tool call (a JSON object {"name", "arguments"} that validates against that tool's parameters). "auto"
    (default): prose stays free, an answer that opens an object must be a valid call. "none": free."""
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None, None
    if choice in (None, "auto"):
        return None, tool_call_grammar(tools)
    if not isinstance(tools, list):
        raise APIError(400, "invalid tools: expected an array")
    only = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, "invalid tool_choice: expected {type: function, function: {name}}")
        only = fn["name"]
    elif choice != "required":
        raise APIError(400, f"invalid tool_choice {choice!r}: expected none, auto, required or a function")
    try:
        return compile_tool_calls(tools, only), None
    except SchemaError as exc:
        raise APIError(400, str(exc)) from None


async def _start(st: AppState, entry: ModelEntry, body: dict[str, Any], prompt_fn: Any, images: bool,
                 tools: Any, top_logprobs: int | None) -> tuple[Any, Any, float]:
    opts = _options(body)
    fmt, ka = check_common(st, entry, options=opts, fmt=_format(body), keep_alive=body.get("keep_alive"),
                           think=None, logprobs=None, top_logprobs=None, images=images)
    grammar, lazy = _tool_grammar(body, tools)
    if fmt is not None:
        lazy = None  # a response_format decides the answer's shape
    view = await st.manager.acquire(entry)
    try:
        if tools and not gen.supports_tools(view):
            raise APIError(400, f'"{entry.name.display}" does not support tools')
        options = view.base_options.merged(opts)
        ids = gen.encode_prompt(view, prompt_fn(view))
        handle = gen.submit(view, ids, options, fmt, top_logprobs=top_logprobs, grammar=grammar, tool_grammar=lazy)
    except BaseException:
        st.manager.release(view, ka)
        raise
    return view, handle, ka


def _usage(final: Any) -> dict[str, int]:
    return {"prompt_tokens": final.prompt_eval_count, "completion_tokens": final.eval_count,
            "total_tokens": final.prompt_eval_count + final.eval_count}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def _generate(request: Request, kind: str) -> Any:
    st = state(request)
    body = await read_json(request)
    entry = resolve_model(st.store, body.get("model") if isinstance(body.get("model"), str) else None)
    stream = body.get("stream") is True
    include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
    tools = body.get("tools") if kind == "chat" else None
    if kind == "chat":
        messages, images = _messages(body.get("messages"))
        prompt_fn = lambda view: gen.chat_prompt(view, messages, tools)  # noqa: E731
    else:
        prompt, images = body.get("prompt"), False
        if not isinstance(prompt, str):
            raise APIError(400, "invalid prompt: 'prompt' must be a string")
        suffix = body.get("suffix")
        prompt_fn = lambda view: gen.generate_prompt(view, prompt, None, None, suffix)  # noqa: E731
    top_logprobs = _top_logprobs(body, kind)
    view, handle, ka = await _start(st, entry, body, prompt_fn, images, tools, top_logprobs)
    tokenizer = view.runner.tokenizer
    if not stream:
        handle.coalesce()  # answered in one piece: no hand-off to this event loop per token
    n = next(_counter)
    ident = f"chatcmpl-{n}" if kind == "chat" else f"cmpl-{n}"
    obj = "chat.completion" if kind == "chat" else "text_completion"
    created = int(time.time())
    name = entry.name.display
    head = {"id": ident, "object": obj + (".chunk" if stream and kind == "chat" else ""), "created": created,
            "model": name, "system_fingerprint": "fp_ollama"}

    async def pieces() -> AsyncIterator[tuple[str, Any]]:
        try:
            async for chunk in handle:
                if chunk.done:
                    if chunk.error is not None:
                        raise APIError(500, chunk.error)
                    yield "final", chunk
                    return
                if chunk.logprobs:
                    yield "logprobs", chunk.logprobs
                if chunk.text:
                    yield "text", chunk.text
        finally:
            handle.cancel()
            st.manager.release(view, ka)

    async def collect() -> tuple[list[str], Any, list[Any]]:
        text_parts, final, lps = [], None, []
        async with contextlib.aclosing(pieces()) as it:
            async for what, value in it:
                if what == "text":
                    text_parts.append(value)
                elif what == "logprobs":
                    lps.extend(value)
                else:
                    final = value
        return text_parts, final, lps

    def logprobs_of(lps: list[Any], offset: int = 0) -> Any:
        if top_logprobs is None:
            return None
        if kind == "chat":
            return openai_chat_logprobs(tokenizer, lps)
        return openai_completion_logprobs(tokenizer, lps, offset)

    if not stream:
        text_parts, final, lps = await unless_disconnected(request, collect())
        text = "".join(text_parts)
        reason = _finish(final.done_reason)
        if kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = gen.parse_tool_calls(text) if tools else None
            if calls:
                message = {"role": "assistant", "content": "", "tool_calls": _openai_tool_calls(calls)}
                reason = "tool_calls"
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": logprobs_of(lps),
                                      "finish_reason": reason}
        else:
            choice = {"text": text, "index": 0, "logprobs": logprobs_of(lps), "finish_reason": reason}
        return {**head, "choices": [choice], "usage": _usage(final)}

    pending: list[Any] = []  # logprobs of tokens whose text has not been sent yet
    sent = [0]  # characters of text sent (completions' text_offset)

    def delta_chunk(delta: dict[str, Any] | str, reason: str | None) -> dict[str, Any]:
        lp = None
        if pending:
            lp = logprobs_of(list(pending), sent[0])
            pending.clear()
        elif top_logprobs is not None and reason is None:
            lp = logprobs_of([], sent[0])
        if kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            choice = {"text": delta, "index": 0, "logprobs": lp, "finish_reason": reason}
            sent[0] += len(delta)
        return {**head, "choices": [choice]}

    async def sse() -> AsyncIterator[bytes]:
        first, held, holding = True, [], bool(tools)
        try:
            async for what, value in pieces():
                if what == "logprobs":
                    pending.extend(value)
                    continue
                if what == "text":
                    if holding:
                        held.append(value)
                        if gen.looks_like_tool_call("".join(held)):
                            continue
                        holding, value, held = False, "".join(held), []
                    if kind == "chat":
                        delta = {"role": "assistant", "content": value} if first else {"content": value}
                        yield _sse(delta_chunk(delta, None))
                    else:
                        yield _sse(delta_chunk(value, None))
                    first = False
                    continue
                reason = _finish(value.done_reason)
                text = "".join(held)
                calls = gen.parse_tool_calls(text) if tools and text else None
                if calls:
                    yield _sse(delta_chunk({"role": "assistant", "tool_calls": _openai_tool_calls(calls)}, None))
                    reason = "tool_calls"
                elif text:
                    yield _sse(delta_chunk({"role": "assistant", "content": text} if kind == "chat" else text, None))
                elif first and kind == "chat":
                    yield _sse(delta_chunk({"role": "assistant", "content": ""}, None))
                yield _sse(delta_chunk({} if kind == "chat" else "", reason))
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(value)})
        except Exception as exc:  # noqa: BLE001 - reported in-band, the status is already 200
            status, message = status_and_message(exc)
            yield _sse({"error": {"message": message, "type": "api_error", "param": None, "code": None}})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    return await _generate(request, "chat")


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await _generate(request, "completion")


def _model_object(entry: ModelEntry) -> dict[str, Any]:
    ns = entry.name.namespace if entry.name.host == "registry.ollama.ai" else entry.name.host
    return {"id": entry.name.display, "object": "model", "created": int(entry.modified_at.timestamp()),
            "owned_by": ns}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_object(e) for e in state(request).store.list()]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    return _model_object(resolve_model(state(request).store, model))


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Any:
    st = state(request)
    body = await read_json(request)
    entry = resolve_model(st.store, body.get("model") if isinstance(body.get("model"), str) else None)
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise APIError(400, "invalid input: expected a non-empty string or array of non-empty strings")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, f"invalid encoding_format {fmt!r}: expected 'float' or 'base64'")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise APIError(400, f"invalid dimensions {dims!r}: expected a positive integer")
    view = await st.manager.acquire(entry)
    try:
        vectors, tokens = await gen.embed_texts(view, texts, True, view.base_options,
                                                normalize=True, dimensions=dims)
    finally:
        st.manager.release(view, None)
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if fmt == "base64":
            # Little-endian float32 bytes, as the openai client decodes them (numpy frombuffer dtype "float32").
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "embedding": emb, "index": i})
    return {"object": "list", "data": data, "model": entry.name.display,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
