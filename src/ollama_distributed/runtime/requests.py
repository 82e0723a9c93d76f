"""What callers hand the engine and what they get back: requests, streamed chunks, handles, errors.

A `RequestHandle` is consumed either synchronously (`for chunk in handle`) or from asyncio
(`async for chunk in handle`, e.g. a FastAPI streaming response); the engine thread pushes chunks through a
thread-safe queue, or with `loop.call_soon_threadsafe` into an `asyncio.Queue` once an event loop is iterating.
Leaving either iteration early (break, client disconnect, task cancelled) cancels the request, so its KV cache
is freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator

from ..model.errors import ContextLengthError  # an input does not fit num_ctx (the API answers 400)
from ..model.options import GenerationOptions

if TYPE_CHECKING:  # pragma: no cover
    from .engine import _Seq


class QueueFullError(RuntimeError):
    """Too many requests are waiting (the API answers 503)."""


class EngineClosedError(RuntimeError):
    """The engine was closed (model unloaded or server shutting down)."""


__all__ = [
    "ContextLengthError",
    "EngineClosedError",
    "GenerationChunk",
    "GenerationError",
    "GenerationRequest",
    "QueueFullError",
    "RequestHandle",
]


class GenerationError(RuntimeError):
    """A request ended with an error (raised by `RequestHandle.result`)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompt token ids (already templated and tokenised) and its options.

    truncate: a prompt longer than num_ctx is shortened Ollama's way (first num_keep + most recent tokens);
    False makes it a ContextLengthError instead (Ollama's `truncate: false`).
    shift: when generation fills num_ctx before num_predict is reached, drop half of the tokens after the first
    num_keep and go on (Ollama's context shift, `shift: true`); False (default here) ends with "length".
    """

    prompt_ids: list[int]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    request_id: str | None = None
    truncate: bool = True
    shift: bool = False


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of the stream. Non-final chunks carry text (possibly "" while a stop prefix is held back) and the
    token ids sampled since the previous chunk. The final chunk (done=True) carries done_reason — "stop",
    "length", "cancel", or None with `error` set — and the metrics (durations in integer nanoseconds, Ollama's
    units); its text is "" except from `RequestHandle.result()`, which returns the whole text in one chunk.
    """

    text: str
    token_ids: list[int]
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0
    prompt_eval_duration_ns: int = 0
    eval_count: int = 0
    eval_duration_ns: int = 0
    total_duration_ns: int = 0
    load_duration_ns: int = 0
    error: str | None = None

    @classmethod
    def final(cls, seq: "_Seq", reason: str | None, error: str | None = None) -> "GenerationChunk":
        """The closing chunk of a sequence, with its metrics."""
        now = time.perf_counter()
        start = seq.t_prefill_start if seq.t_prefill_start is not None else now
        prompt_done = seq.t_prompt_done if seq.t_prompt_done is not None else now
        last = seq.t_last_token if seq.t_last_token is not None else prompt_done
        return cls(
            text="",
            token_ids=[],
            done=True,
            done_reason=reason,
            prompt_eval_count=seq.n_prompt,
            prompt_eval_duration_ns=int((prompt_done - start) * 1e9) if seq.t_prompt_done else 0,
            eval_count=seq.n_generated,
            eval_duration_ns=max(0, int((last - prompt_done) * 1e9)),
            total_duration_ns=int((now - seq.t_submit) * 1e9),
            error=error,
        )


class RequestHandle:
    """A running request's stream of `GenerationChunk`s (sync or async iterator), ending with done=True."""

    def __init__(self, request_id: str, seq_id: int, wake: Callable[[], None]) -> None:
        self.request_id = request_id
        self.seq_id = seq_id
        self._wake = wake
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._sync: queue.Queue[GenerationChunk] = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Queue[GenerationChunk] | None = None
        self._done = threading.Event()
        self._consumed_final = False

    # ---- producer side (engine thread) ----------------------------------------------------------------------------

    def _push(self, chunk: GenerationChunk) -> None:
        with self._lock:
            if self._done.is_set():
                return  # exactly one final chunk, nothing after it
            if chunk.done:
                self._done.set()
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._async.put_nowait, chunk)  # type: ignore[union-attr]
                except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                    self._cancelled.set()
            else:
                self._sync.put(chunk)

    # ---- consumer side --------------------------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """The final chunk has been produced (not necessarily consumed)."""
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the KV cache is freed at the next step boundary and the stream ends with
        done_reason "cancel". No effect once the request is done."""
        if not self._done.is_set():
            self._cancelled.set()
            self._wake()

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self._iter_sync()

    def _iter_sync(self, timeout: float | None = None) -> Iterator[GenerationChunk]:
        if self._loop is not None:
            raise RuntimeError("this handle is already being consumed by an async iterator")
        if self._consumed_final:
            raise RuntimeError("this handle's stream has already been consumed")
        try:
            while True:
                chunk = self._sync.get(timeout=timeout)
                yield chunk
                if chunk.done:
                    self._consumed_final = True
                    return
        finally:
            if not self._consumed_final:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._iter_async()

    async def _iter_async(self) -> AsyncIterator[GenerationChunk]:
        if self._consumed_final:
            raise RuntimeError("this handle's stream has already been consumed")
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
                self._async = asyncio.Queue()
                while True:  # chunks produced before the consumer attached
                    try:
                        self._async.put_nowait(self._sync.get_nowait())
                    except queue.Empty:
                        break
            elif self._loop is not asyncio.get_running_loop():
                raise RuntimeError("this handle is bound to another event loop")
        aq = self._async
        assert aq is not None
        try:
            while True:
                chunk = await aq.get()
                yield chunk
                if chunk.done:
                    self._consumed_final = True
                    return
        finally:
            if not self._consumed_final:
                self.cancel()

    def result(self, timeout: float | None = None) -> GenerationChunk:
        """Wait for the end; the whole text and token ids in one final chunk. Raises GenerationError on error."""
        return _collect(self._iter_sync(timeout))

    async def aresult(self) -> GenerationChunk:
        """`result()` from asyncio."""
        parts: list[GenerationChunk] = []
        async for chunk in self:
            parts.append(chunk)
        return _combine(parts)


def _collect(chunks: Iterator[GenerationChunk]) -> GenerationChunk:
    return _combine(list(chunks))


def _combine(parts: list[GenerationChunk]) -> GenerationChunk:
    final = parts[-1]
    if final.error is not None:
        raise GenerationError(final.error)
    text = "".join(p.text for p in parts)
    ids = [t for p in parts for t in p.token_ids]
    return GenerationChunk(
        text=text,
        token_ids=ids,
        done=True,
        done_reason=final.done_reason,
        prompt_eval_count=final.prompt_eval_count,
        prompt_eval_duration_ns=final.prompt_eval_duration_ns,
        eval_count=final.eval_count,
        eval_duration_ns=final.eval_duration_ns,
        total_duration_ns=final.total_duration_ns,
        load_duration_ns=final.load_duration_ns,
        error=None,
    )

