"""Helpers shared by the routers: app state access, model resolution, NDJSON streaming, metrics fields."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..runtime.requests import GenerationChunk
from ..service.models import ModelManager
from ..service.names import ModelName
from ..service.settings import ServerSettings
from ..service.store import ModelEntry, ModelNotFoundError, ModelStore
from .errors import APIError, status_and_message

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"


@dataclass
class AppState:
    settings: ServerSettings
    store: ModelStore
    manager: ModelManager


def state(request: Request) -> AppState:
    return request.app.state.od


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def resolve_model(store: ModelStore, name: str | None) -> ModelEntry:
    """The store entry for a request's model: missing → 400 `model is required`, bad name → 400, unknown → 404."""
    if not name:
        raise APIError(400, "model is required")
    parsed = ModelName.parse(name)
    try:
        return store.get(parsed)
    except ModelNotFoundError:
        raise ModelNotFoundError(name) from None  # the name as the client wrote it


def metrics(final: GenerationChunk, load_duration_ns: int) -> dict[str, Any]:
    """Ollama's final-line metrics (integer nanoseconds)."""
    return {
        "total_duration": final.total_duration_ns + load_duration_ns,
        "load_duration": load_duration_ns,
        "prompt_eval_count": final.prompt_eval_count,
        "prompt_eval_duration": final.prompt_eval_duration_ns,
        "eval_count": final.eval_count,
        "eval_duration": final.eval_duration_ns,
    }


def ndjson_line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def ndjson_response(lines: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Stream objects as NDJSON; an exception after the first line becomes a final `{"error": ...}` line (the
    status is already 200, checklist §0)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for obj in lines:
                yield ndjson_line(obj)
        except Exception as exc:  # noqa: BLE001 - reported to the client in-band
            status, message = status_and_message(exc)
            if status >= 500:
                log.exception("stream failed", exc_info=exc)
            yield ndjson_line({"error": message})

    return StreamingResponse(body(), media_type=NDJSON)


async def first_then_rest(lines: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Pull the first item eagerly so that errors raised before any output still become a proper HTTP error."""
    it = lines.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        async def empty() -> AsyncIterator[dict[str, Any]]:
            return
            yield  # pragma: no cover

        return empty()

    async def rest() -> AsyncIterator[dict[str, Any]]:
        yield first
        async for item in it:
            yield item

    return rest()


async def stream_or_last(lines: AsyncIterator[dict[str, Any]], stream: bool) -> Any:
    """Status-line endpoints (create, pull): NDJSON when streaming, else only the last object."""
    started = await first_then_rest(lines)
    if stream:
        return ndjson_response(started)
    last: dict[str, Any] = {}
    async for obj in started:
        last = obj
    return JSONResponse(last)


async def iterate_in_thread(make: Callable[[], Iterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """Run a blocking generator in a worker thread, yielding its items on the event loop as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in make():
                if stop.is_set():
                    return
                loop.call_soon_threadsafe(queue.put_nowait, item)
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)

    thread = threading.Thread(target=worker, daemon=True, name="store-op")
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


async def unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work` (a coroutine) but cancel it when the client goes away: a non-streaming response is only sent
    at the end, so nothing else would notice the disconnect and the generation would run on (Ollama cancels the
    request's context, routes.go). Cancelling closes the generator, which cancels the engine request."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client disconnected from %s; cancelling its request", request.url.path)
                task.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()
