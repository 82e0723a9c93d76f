"""Ollama inference endpoints: /api/generate, /api/chat, /api/embed, /api/embeddings (docs/api.md, api/types.go).

Every handler: parse the body (400 on empty/malformed/wrong types, unknown fields ignored), resolve the model
(400 missing, 404 unknown), validate options/format/keep_alive before loading anything, then load off the event
loop, submit to the engine and stream NDJSON (default) or answer with one object (`"stream": false`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, AsyncIterator, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..model.options import GenerationOptions
from ..runtime.engine import truncate_prompt
from ..service import generation as gen
from ..service.grammar import SchemaError, normalize_format, tool_call_grammar
from ..service.models import ModelView
from ..service.settings import parse_keep_alive
from ..service.store import ModelEntry
from .common import (
    AppState, metrics, ndjson_response, now_rfc3339, resolve_model, state, unless_disconnected,
)
from .errors import APIError, parse_body, read_json
from .logprobs import ollama_logprobs

log = logging.getLogger(__name__)
router = APIRouter()

KeepAlive = Union[int, float, str, None]


class _Strict(BaseModel):
    # Go's encoding/json rejects a string where a bool is expected; pydantic's strict mode matches that, and
    # unknown fields are ignored as Ollama ignores them.
    model_config = ConfigDict(extra="ignore", strict=True)


class GenerateRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    stream: bool | None = None
    raw: bool | None = None
    format: Any = None
    keep_alive: KeepAlive = None
    images: list[str] | None = None
    options: dict[str, Any] | None = None
    think: Union[bool, Literal["low", "medium", "high", "max"], None] = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    format: Any = None
    options: dict[str, Any] | None = None
    stream: bool | None = None
    keep_alive: KeepAlive = None
    think: Union[bool, Literal["low", "medium", "high", "max"], None] = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class EmbedRequest(_Strict):
    model: str | None = None
    input: Any = None
    truncate: bool | None = None
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


ROLES = ("system", "user", "assistant", "tool")


def check_common(st: AppState, entry: ModelEntry, *, options: dict | None, fmt: Any, keep_alive: Any,
                 think: Any, logprobs: bool | None, top_logprobs: int | None, images: bool) -> tuple[Any, float]:
    """Validation that needs no loaded model (a schema is compiled here, so a bad one is a 400 before any
    load). Returns (format, keep_alive seconds)."""
    GenerationOptions.from_dict(options)  # raises InvalidOptionError → 400 before any load
    try:
        fmt = normalize_format(fmt)
    except SchemaError as exc:
        raise APIError(400, str(exc)) from None
    ka = parse_keep_alive(keep_alive, st.settings.keep_alive_s)
    if think not in (None, False):
        raise APIError(400, f'"{entry.name.display}" does not support thinking')
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise APIError(400, f"top_logprobs must be between 0 and 20, got {top_logprobs}")
    if images:
        raise APIError(400, f'"{entry.name.display}" does not support images (it is a text model)')
    return fmt, ka


async def load_or_unload(st: AppState, entry: ModelEntry, ka: float, body: dict[str, Any]) -> JSONResponse:
    """Empty prompt / messages: load the model (done_reason "load"), or with keep_alive 0 unload it ("unload")."""
    if ka == 0:
        await st.manager.unload(entry)
        reason = "unload"
    else:
        view = await st.manager.acquire(entry)
        st.manager.release(view, ka)
        reason = "load"
    return JSONResponse({"model": entry.name.display, "created_at": now_rfc3339(), **body, "done": True,
                         "done_reason": reason})


def _prompt_ids_for_context(view: ModelView, ids: list[int], options: GenerationOptions) -> list[int]:
    num_ctx = min(options.num_ctx, view.runner.engine.context_limit)
    return truncate_prompt(ids, num_ctx, options.num_keep)


@router.post("/api/generate")
async def generate(request: Request) -> Any:
    st = state(request)
    req: GenerateRequest = parse_body(GenerateRequest, await read_json(request))
    entry = resolve_model(st.store, req.model)
    fmt, ka = check_common(st, entry, options=req.options, fmt=req.format, keep_alive=req.keep_alive,
                           think=req.think, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                           images=bool(req.images))
    if req.raw and (req.template or req.system or req.context):
        raise APIError(400, "raw mode does not support template, system, or context")
    if not req.prompt and not req.suffix:
        return await load_or_unload(st, entry, ka, {"response": ""})
    view = await st.manager.acquire(entry)
    try:
        options = view.base_options.merged(req.options)
        if req.raw:
            text = req.prompt or ""
        else:
            text = gen.generate_prompt(view, req.prompt or "", req.system, req.template, req.suffix)
        ids = gen.encode_prompt(view, text, None if req.raw else req.context)
        handle = gen.submit(view, ids, options, fmt, truncate=req.truncate is not False,
                            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        if req.stream is False:
            handle.coalesce()  # answered in one piece: no hand-off to this event loop per token
    except BaseException:
        st.manager.release(view, ka)
        raise
    context_prefix = _prompt_ids_for_context(view, ids, options)
    name = entry.name.display
    tokenizer = view.runner.tokenizer

    async def lines() -> AsyncIterator[dict[str, Any]]:
        generated: list[int] = []
        pending_lps: list[Any] = []  # logprobs of tokens whose text is still held back (a stop-string prefix)
        try:
            async for chunk in handle:
                if chunk.done:
                    if chunk.error is not None:
                        raise APIError(500, chunk.error)
                    final = {"model": name, "created_at": now_rfc3339(), "response": "", "done": True,
                             "done_reason": chunk.done_reason, **metrics(chunk, view.load_duration_ns)}
                    if not req.raw:
                        final["context"] = context_prefix + generated
                    if pending_lps:
                        final["logprobs"] = ollama_logprobs(tokenizer, pending_lps)
                    yield final
                    return
                generated.extend(chunk.token_ids)
                pending_lps.extend(chunk.logprobs)
                if chunk.text:
                    out = {"model": name, "created_at": now_rfc3339(), "response": chunk.text, "done": False}
                    if pending_lps:
                        out["logprobs"], pending_lps = ollama_logprobs(tokenizer, pending_lps), []
                    yield out
        finally:
            handle.cancel()
            st.manager.release(view, ka)

    if req.stream is not False:
        return ndjson_response(lines())
    async def collect() -> dict[str, Any]:
        parts: list[str] = []
        lps: list[dict[str, Any]] = []
        final: dict[str, Any] = {}
        # aclosing: the request is cancelled and its KV cache freed even when this is cancelled midway.
        async with contextlib.aclosing(lines()) as it:
            async for obj in it:
                lps.extend(obj.get("logprobs", ()))
                if obj["done"]:
                    final = obj
                else:
                    parts.append(obj["response"])
        final["response"] = "".join(parts)
        if req.logprobs:
            final["logprobs"] = lps
        return final

    return JSONResponse(await unless_disconnected(request, collect()))


def _chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages or []):
        role = m.role.lower()
        if role not in ROLES:
            raise APIError(400, f"messages[{i}]: invalid role {m.role!r}: expected one of {', '.join(ROLES)}")
        msg: dict[str, Any] = {"role": role, "content": m.content or ""}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.tool_name:
            msg["tool_name"] = m.tool_name
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


@router.post("/api/chat")
async def chat(request: Request) -> Any:
    st = state(request)
    req: ChatRequest = parse_body(ChatRequest, await read_json(request))
    entry = resolve_model(st.store, req.model)
    fmt, ka = check_common(st, entry, options=req.options, fmt=req.format, keep_alive=req.keep_alive,
                           think=req.think, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                           images=any(m.images for m in req.messages or []))
    messages = _chat_messages(req)
    if not messages:
        return await load_or_unload(st, entry, ka, {"message": {"role": "assistant", "content": ""}})
    view = await st.manager.acquire(entry)
    try:
        if req.tools and not gen.supports_tools(view):
            raise APIError(400, f'"{entry.name.display}" does not support tools')
        options = view.base_options.merged(req.options)
        ids = gen.encode_prompt(view, gen.chat_prompt(view, messages, req.tools))
        handle = gen.submit(view, ids, options, fmt, truncate=req.truncate is not False,
                            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                            tool_grammar=tool_call_grammar(req.tools) if fmt is None else None)
        if req.stream is False:
            handle.coalesce()  # answered in one piece: no hand-off to this event loop per token
    except BaseException:
        st.manager.release(view, ka)
        raise
    name = entry.name.display
    tools = bool(req.tools)
    tokenizer = view.runner.tokenizer
    pending_lps: list[Any] = []  # logprobs of tokens not yet sent (text held back)

    def line(content: str, **extra: Any) -> dict[str, Any]:
        out = {"model": name, "created_at": now_rfc3339(),
               "message": {"role": "assistant", "content": content, **extra}, "done": False}
        if pending_lps:
            out["logprobs"] = ollama_logprobs(tokenizer, pending_lps)
            pending_lps.clear()
        return out

    async def lines() -> AsyncIterator[dict[str, Any]]:
        held: list[str] = []  # text held back while it may still be a tool call
        holding = tools
        try:
            async for chunk in handle:
                if chunk.done:
                    if chunk.error is not None:
                        raise APIError(500, chunk.error)
                    text = "".join(held)
                    calls = gen.parse_tool_calls(text) if tools and text else None
                    if calls:
                        yield line("", tool_calls=calls)
                    elif text:
                        yield line(text)
                    final = line("")
                    final.update(done=True, done_reason=chunk.done_reason, **metrics(chunk, view.load_duration_ns))
                    yield final
                    return
                pending_lps.extend(chunk.logprobs)
                if not chunk.text:
                    continue
                if holding:
                    held.append(chunk.text)
                    if gen.looks_like_tool_call("".join(held)):
                        continue
                    holding = False
                    chunk_text, held = "".join(held), []
                    yield line(chunk_text)
                else:
                    yield line(chunk.text)
        finally:
            handle.cancel()
            st.manager.release(view, ka)

    if req.stream is not False:
        return ndjson_response(lines())
    async def collect() -> dict[str, Any]:
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        lps: list[dict[str, Any]] = []
        final: dict[str, Any] = {}
        async with contextlib.aclosing(lines()) as it:
            async for obj in it:
                lps.extend(obj.get("logprobs", ()))
                if obj["done"]:
                    final = obj
                else:
                    content.append(obj["message"]["content"])
                    calls.extend(obj["message"].get("tool_calls", []))
        final["message"] = {"role": "assistant", "content": "".join(content)}
        if calls:
            final["message"]["tool_calls"] = calls
        if req.logprobs:
            final["logprobs"] = lps
        return final

    return JSONResponse(await unless_disconnected(request, collect()))


def embed_inputs(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise APIError(400, "invalid input type: expected a string or an array of strings")


@router.post("/api/embed")
async def embed(request: Request) -> Any:
    st = state(request)
    req: EmbedRequest = parse_body(EmbedRequest, await read_json(request))
    entry = resolve_model(st.store, req.model)
    texts = embed_inputs(req.input)
    GenerationOptions.from_dict(req.options)
    ka = parse_keep_alive(req.keep_alive, st.settings.keep_alive_s)
    if req.dimensions is not None and req.dimensions < 1:
        raise APIError(400, f"dimensions must be >= 1, got {req.dimensions}")
    t0 = time.perf_counter()
    view = await st.manager.acquire(entry)
    try:
        options = view.base_options.merged(req.options)
        vectors, tokens = await gen.embed_texts(view, texts, req.truncate is not False, options,
                                                normalize=True, dimensions=req.dimensions)
    except gen.UnsupportedRequestError as exc:
        raise APIError(400, str(exc)) from None
    finally:
        st.manager.release(view, ka)
    return {"model": entry.name.display, "embeddings": vectors,
            "total_duration": int((time.perf_counter() - t0) * 1e9),
            "load_duration": view.load_duration_ns, "prompt_eval_count": tokens}


@router.post("/api/embeddings")
async def embeddings(request: Request) -> Any:
    st = state(request)
    req: EmbeddingsRequest = parse_body(EmbeddingsRequest, await read_json(request))
    entry = resolve_model(st.store, req.model)
    GenerationOptions.from_dict(req.options)
    ka = parse_keep_alive(req.keep_alive, st.settings.keep_alive_s)
    view = await st.manager.acquire(entry)
    try:
        if not req.prompt:
            return {"embedding": []}
        options = view.base_options.merged(req.options)
        vectors, _ = await gen.embed_texts(view, [req.prompt], True, options, normalize=False)
    finally:
        st.manager.release(view, ka)
    return {"embedding": vectors[0]}
