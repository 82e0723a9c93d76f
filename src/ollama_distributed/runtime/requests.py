"""What callers hand the engine and what they get back: requests, streamed chunks, handles, errors.

A `RequestHandle` is consumed either synchronously (`for chunk in handle`) or from asyncio
(`async for chunk in handle`, e.g. a FastAPI streaming response). The engine thread appends chunks to the
handle's buffer and wakes the consumer only when it is waiting for one: a consumer that is still busy with the
previous chunk picks the next ones up without another thread hand-off, so a loaded event loop gets one wake-up
per burst of tokens, not one per token. A caller that only answers at the end (`result()`, `aresult()`, or
`coalesce()` before iterating) is woken once, when the request ends. Chunks carry the engine's timestamp, so
token timings measured from them do not depend on when the consumer read them.
Leaving either iteration early (break, client disconnect, task cancelled) cancels the request, so its KV cache
is freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from ..model.errors import ContextLengthError  # an input does not fit num_ctx (the API answers 400)
from ..model.options import GenerationOptions


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
    constraint: a `model.sampling.TokenConstraint` (e.g. a JSON-schema grammar) the sampled tokens must follow.
    top_logprobs: None (no logprobs) or N >= 0: every token chunk carries its logprob and N alternatives.
    """

    prompt_ids: list[int]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    request_id: str | None = None
    truncate: bool = True
    shift: bool = False
    constraint: Any = None
    top_logprobs: int | None = None


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of the stream. Non-final chunks carry text (possibly "" while a stop prefix is held back) and the
    token ids sampled since the previous chunk. The final chunk (done=True) carries done_reason — "stop",
    "length", "cancel", or None with `error` set — and the metrics (durations in integer nanoseconds, Ollama's
    units); its text is "" except from `RequestHandle.result()`, which returns the whole text in one chunk.

    time: `time.perf_counter()` when the engine produced the chunk (for a token, right after sampling it), so
    TTFT and inter-token latency can be measured by a consumer that reads chunks late; 0.0 if unknown.
    batch: sequences in the engine step that sampled this chunk's token (0 for chunks without one).
    logprobs: `model.sampling.TokenLogprob` of each token in token_ids, when the request asked for logprobs.
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
    time: float = 0.0
    batch: int = 0
    logprobs: tuple = ()


class RequestHandle:
    """A running request's stream of `GenerationChunk`s (sync or async iterator), ending with done=True."""

    def __init__(self, request_id: str, seq_id: int, wake: Callable[[], None]) -> None:
        self.request_id = request_id
        self.seq_id = seq_id
        self._wake = wake
        self._cancelled = threading.Event()
        # Guards the buffer and the waiter; sync consumers wait on it.
        self._cond = threading.Condition(threading.Lock())
        self._chunks: collections.deque[GenerationChunk] = collections.deque()  # produced, not yet consumed
        self._pushed = 0  # chunks produced so far (a sync consumer's timeout counts from the last one)
        self._final: GenerationChunk | None = None
        self._at_end = False  # wake the consumer only for the final chunk (see `coalesce`)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None  # set while an async consumer waits for a chunk
        self._consumed_final = False

    # ---- producer side (engine thread) ----------------------------------------------------------------------------

    def _push(self, chunk: GenerationChunk) -> None:
        with self._cond:
            if self._final is not None:
                return  # exactly one final chunk, nothing after it
            if chunk.done:
                self._final = chunk
            self._chunks.append(chunk)
            self._pushed += 1
            if self._at_end and not chunk.done:
                return
            self._cond.notify_all()
            waiter, self._waiter = self._waiter, None
            loop = self._loop
        # Only a consumer that is waiting needs a wake-up: one busy with earlier chunks finds this one in the
        # buffer, so a lagging event loop is not handed one callback per token.
        if waiter is not None:
            try:
                loop.call_soon_threadsafe(_wake_waiter, waiter)  # type: ignore[union-attr]
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                self._cancelled.set()
        elif loop is not None and loop.is_closed():
            self._cancelled.set()

    # ---- consumer side --------------------------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """The final chunk has been produced (not necessarily consumed)."""
        return self._final is not None

    def cancel(self) -> None:
        """Stop generating; the KV cache is freed at the next step boundary and the stream ends with
        done_reason "cancel". No effect once the request is done."""
        if self._final is None:
            self._cancelled.set()
            self._wake()

    def coalesce(self) -> None:
        """Wake the consumer only when the request ends, then hand over every chunk at once: for callers that
        answer with the whole text (non-streaming), which would otherwise take a thread hand-off per token
        for nothing. Chunks and their order are unchanged (their `time` still says when each token came)."""
        with self._cond:
            self._at_end = True

    def __iter__(self) -> Iterator[GenerationChunk]:
        return self._iter_sync()

    def _iter_sync(self, timeout: float | None = None) -> Iterator[GenerationChunk]:
        """timeout: raise queue.Empty when no chunk is produced for this many seconds."""
        if self._loop is not None:
            raise RuntimeError("this handle is already being consumed by an async iterator")
        if self._consumed_final:
            raise RuntimeError("this handle's stream has already been consumed")
        try:
            while True:
                with self._cond:
                    while not self._ready():
                        seen = self._pushed
                        # (a coalescing consumer is not woken per chunk, but chunks still count as progress)
                        if not self._cond.wait(timeout) and self._pushed == seen:
                            raise queue.Empty
                    chunks = list(self._chunks)
                    self._chunks.clear()
                for chunk in chunks:
                    yield chunk
                    if chunk.done:
                        self._consumed_final = True
                        return
        finally:
            if not self._consumed_final:
                self.cancel()

    def _ready(self) -> bool:
        return self._final is not None if self._at_end else bool(self._chunks)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._iter_async()

    async def _iter_async(self) -> AsyncIterator[GenerationChunk]:
        if self._consumed_final:
            raise RuntimeError("this handle's stream has already been consumed")
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._loop is None:
                self._loop = loop
            elif self._loop is not loop:
                raise RuntimeError("this handle is bound to another event loop")
        try:
            while True:
                with self._cond:
                    if self._ready():
                        chunks = list(self._chunks)
                        self._chunks.clear()
                    else:
                        chunks = []
                        self._waiter = waiter = loop.create_future()
                if not chunks:
                    await waiter
                    continue
                for chunk in chunks:
                    yield chunk
                    if chunk.done:
                        self._consumed_final = True
                        return
        finally:
            self._waiter = None
            if not self._consumed_final:
                self.cancel()

    def result(self, timeout: float | None = None) -> GenerationChunk:
        """Wait for the end; the whole text and token ids in one final chunk. Raises GenerationError on error.
        timeout: raise queue.Empty when the engine produces nothing for this many seconds."""
        self.coalesce()
        return _collect(self._iter_sync(timeout))

    async def aresult(self) -> GenerationChunk:
        """`result()` from asyncio."""
        self.coalesce()
        parts: list[GenerationChunk] = []
        async for chunk in self:
            parts.append(chunk)
        return _combine(parts)


def _wake_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # (its consumer may have been cancelled meanwhile)
        waiter.set_result(None)


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
        time=final.time,
        logprobs=tuple(lp for p in parts for lp in p.logprobs),
    )

