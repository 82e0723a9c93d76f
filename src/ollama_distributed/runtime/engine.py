"""The inference engine: requests in, streamed chunks out, continuous batching over any `Executor`.

One background thread owns the executor (executors need not be thread-safe). Each loop iteration is one
*step*: admit waiting requests (up to max_batch running), drop cancelled ones (freeing their KV caches), then
one `executor.step` that feeds every running sequence its next tokens — a prefill chunk of at most num_batch
prompt tokens (and at most `max_step_tokens` prompt tokens in the whole step, so a long prompt does not stall
everyone's next token, as in vLLM's chunked prefill) or its last sampled token — and finally samples a token for
every sequence whose fed tokens are all in the cache.

Each sequence keeps its full token history (prompt + generated) and how much of it the executor holds
(`n_fed`); the tokens still to feed are always `tokens[n_fed:]`. Prefill and decode are the same operation, and a
sequence can be replayed onto a fresh executor by setting n_fed = 0: `recover` (called when a step fails) and
`replace_executor` use this to move running requests to a new executor unchanged (issue 6), and the optional
context shift uses it to rebuild a shortened context.

Ollama behaviours kept (ollama runner `processBatch`/`NewSequence`): a prompt longer than num_ctx is truncated
keeping its first num_keep tokens and the most recent ones (logged); generation ends with done_reason "stop" at
an end-of-generation token or a stop string (not returned), and "length" at num_predict or when the context is
full. Requests, handles and chunks are defined in `requests.py` (which does not import this module) and
re-exported here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..model.sampling import Sampler, sample_batch
from ..model.stop import StopMatcher
from .executor import Executor
from .requests import (
    ContextLengthError,
    EngineClosedError,
    GenerationChunk,
    GenerationError,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
)

log = logging.getLogger(__name__)

__all__ = [
    "ContextLengthError",
    "EmbeddingResult",
    "EngineClosedError",
    "GenerationChunk",
    "GenerationError",
    "GenerationRequest",
    "InferenceEngine",
    "QueueFullError",
    "RequestHandle",
    "truncate_prompt",
]


@dataclass(frozen=True)
class EmbeddingResult:
    """vector: (hidden,) mean of final-normed hidden states (not normalised); prompt_eval_count: tokens used."""

    vector: list[float]
    prompt_eval_count: int
    truncated: bool = False


def truncate_prompt(ids: Sequence[int], num_ctx: int, num_keep: int) -> list[int]:
    """Ollama's prompt truncation: keep the first num_keep tokens and the most recent ones, num_ctx in all.

    num_keep -1 (or >= num_ctx) keeps as many leading tokens as possible while still keeping the last token.
    """
    ids = list(ids)
    if len(ids) <= num_ctx:
        return ids
    keep = num_ctx - 1 if num_keep < 0 else min(num_keep, num_ctx - 1)
    return ids[:keep] + ids[len(ids) - (num_ctx - keep) :]


@dataclass(eq=False)
class _Seq:
    """Engine-side state of one running request."""

    seq_id: int
    handle: RequestHandle
    request: GenerationRequest
    num_ctx: int
    tokens: list[int]  # full history: prompt (after truncation) + generated
    n_prompt: int
    sampler: Sampler
    decoder: Any
    stop: StopMatcher
    n_fed: int = 0
    n_generated: int = 0
    generated: list[int] = field(default_factory=list)
    t_submit: float = 0.0
    t_prefill_start: float | None = None
    t_prompt_done: float | None = None
    t_last_token: float | None = None

    @property
    def pending(self) -> list[int]:
        return self.tokens[self.n_fed :]


class InferenceEngine:
    """Continuous-batching generation over an `Executor`.

    executor: computes logits; owned by the engine from now on (closed by `close`).
    tokenizer: `model.tokenizer.Tokenizer` (encode/decode/eos_ids; IncrementalDecoder for streaming).
    max_batch: sequences decoded together in one step; max_queue: requests waiting to join (QueueFullError beyond).
    max_step_tokens: prompt tokens fed per step across all prefilling sequences (chunked prefill budget).
    recover: called (on the engine thread) when `executor.step` raises, with the error and the failed executor;
      may return a replacement executor, onto which every running sequence is replayed (prompt + generated
      tokens re-fed from position 0), so the requests continue unchanged. None (or returning None) ends the
      affected requests with the error. At most max_recoveries attempts in a row without a successful step.
    hand_off: called (on the engine thread) when a failed step could not be recovered, with every running and
      waiting sequence; returns True when another engine took them all over (its `adopt`: service/replicas.py
      moves a dropped replica's requests to a surviving one), else they end with the error.
    """

    def __init__(
        self,
        executor: Executor,
        tokenizer: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_step_tokens: int = 512,
        recover: Callable[[Exception, Executor], Executor | None] | None = None,
        max_recoveries: int = 3,
        name: str = "engine",
        hand_off: Callable[[list["_Seq"]], bool] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or max_step_tokens < 1:
            raise ValueError(
                f"max_batch ({max_batch}) and max_step_tokens ({max_step_tokens}) must be >= 1, "
                f"max_queue ({max_queue}) >= 0"
            )
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_step_tokens = max_step_tokens
        self.eos_ids: frozenset[int] = frozenset(getattr(tokenizer, "eos_ids", ()) or ())
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Seq] = collections.deque()
        # work that must run on the engine thread between steps: (function, future for its result)
        self._jobs: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._running: list[_Seq] = []
        self._ids = itertools.count(1)
        self._closed = False
        self.steps = 0  # executor steps run (observability, tests)
        self.replays = 0  # sequences replayed onto a replacement executor
        self._recover = recover
        self._max_recoveries = max_recoveries
        self._failures_in_a_row = 0
        self._hand_off = hand_off
        self.adopted = 0  # sequences taken over from another engine (`adopt`)
        self._thread = threading.Thread(target=self._loop, name=f"{name}-loop", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ----------------------------------------------------------------------------------

    @property
    def config(self):  # -> ModelConfig
        """The model's configuration (from the executor)."""
        return self.executor.config

    @property
    def context_limit(self) -> int:
        """Largest usable num_ctx: the model's trained context and the executor's cache size."""
        return max(1, min(self.executor.max_seq_len, self.executor.config.context_length))

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a generation; returns its handle at once. Raises QueueFullError, EngineClosedError,
        ContextLengthError (prompt too long with truncate=False), ValueError (empty prompt, bad token id)."""
        opts = request.options
        if not request.prompt_ids:
            raise ValueError("prompt_ids is empty: nothing to generate from")
        vocab = self.executor.config.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        num_ctx = min(opts.num_ctx, self.context_limit)
        if num_ctx < opts.num_ctx:
            log.debug("num_ctx %d clamped to %d (model context / cache size)", opts.num_ctx, num_ctx)
        prompt = list(request.prompt_ids)
        if len(prompt) > num_ctx:
            if not request.truncate:
                raise ContextLengthError(
                    f"the prompt has {len(prompt)} tokens, more than the context length num_ctx={num_ctx}"
                )
            prompt = truncate_prompt(prompt, num_ctx, opts.num_keep)
            log.warning(
                "truncating input prompt: limit=%d prompt=%d keep=%d new=%d",
                num_ctx, len(request.prompt_ids), opts.num_keep, len(prompt),
            )
        seq_id = next(self._ids)
        handle = RequestHandle(request.request_id or f"req-{seq_id}", seq_id, self._wake)
        seq = _Seq(
            seq_id=seq_id,
            handle=handle,
            request=request,
            num_ctx=num_ctx,
            tokens=prompt,
            n_prompt=len(prompt),
            sampler=Sampler(opts, num_ctx, constraint=request.constraint, top_logprobs=request.top_logprobs),
            decoder=_make_decoder(self.tokenizer),
            stop=StopMatcher(opts.stop),
            t_submit=time.perf_counter(),
        )
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            # Free batch slots absorb waiting requests at the next step, so they do not count against max_queue.
            free_slots = max(0, self.max_batch - len(self._running))
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFullError(
                    f"server busy: {len(self._waiting)} requests waiting (max_queue={self.max_queue}), "
                    f"{len(self._running)} running (max_batch={self.max_batch})"
                )
            self._waiting.append(seq)
            self._cond.notify_all()
        return handle

    def adopt(self, seqs: Sequence["_Seq"]) -> None:
        """Take over another engine's running or queued sequences (its `hand_off`), ahead of this engine's own
        queue. Each keeps its request, handle, sampler (generator and grammar state), decoder, stop matcher,
        history and timings, gets a sequence id of this engine and is replayed from position 0 (its whole
        history re-fed, as after a recovery), so its client's stream goes on where it stopped. Raises
        EngineClosedError when this engine is closed."""
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            for seq in reversed(seqs):
                seq.seq_id = next(self._ids)
                seq.n_fed = 0
                seq.handle.seq_id = seq.seq_id
                seq.handle._wake = self._wake  # a cancel now wakes this engine
                self._waiting.appendleft(seq)
            self.adopted += len(seqs)
            self._cond.notify_all()

    def generate(self, request: GenerationRequest) -> GenerationChunk:
        """Submit and wait: the whole text in one chunk (raises GenerationError if the request failed)."""
        return self.submit(request).result()

    def embedding(self, inp: str | Sequence[int], *, truncate: bool = True, num_ctx: int | None = None) -> EmbeddingResult:
        """Embed a text (tokenised with the model's tokenizer, BOS as the model wants) or token ids.

        Too long for num_ctx (default: the engine's context limit): truncated to its first num_ctx tokens when
        truncate (Ollama's /api/embed default), else ContextLengthError.
        """
        ids = list(self.tokenizer.encode(inp)) if isinstance(inp, str) else list(inp)
        if not ids:
            raise ValueError("nothing to embed: the input has no tokens")
        limit = min(num_ctx or self.context_limit, self.context_limit)
        truncated = False
        if len(ids) > limit:
            if not truncate:
                raise ContextLengthError(f"the input has {len(ids)} tokens, more than the context length {limit}")
            ids, truncated = ids[:limit], True
        vec = self._call_on_loop(lambda: [float(v) for v in self.executor.embed(ids).reshape(-1).tolist()])
        return EmbeddingResult(vec, len(ids), truncated)

    def embed(self, inp: str | Sequence[int], *, truncate: bool = True, num_ctx: int | None = None) -> list[float]:
        """The embedding vector of a text or token ids (see `embedding`)."""
        return self.embedding(inp, truncate=truncate, num_ctx=num_ctx).vector

    def replace_executor(self, executor: Executor, close_old: bool = True,
                         prepare: Callable[[], Any] | None = None) -> None:
        """Switch to another executor at the next step boundary, replaying every running sequence onto it
        (e.g. after re-planning the cluster). Blocks until the switch is done. `prepare` runs first, on the engine
        thread between steps (e.g. to point a wrapping executor at a new inner one before the replay)."""

        def swap() -> None:
            if prepare is not None:
                prepare()
            old = self._install(executor, "executor replaced")
            if close_old:
                old.close()

        self._call_on_loop(swap)

    def stats(self) -> dict[str, int]:
        """Queue depth and running sequences (for /api/ps, metrics)."""
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running), "steps": self.steps}

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the loop, end every unfinished request with an error, close the executor. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("engine loop did not stop within %s s; closing the executor anyway", timeout)
        try:
            self.executor.close()
        except Exception:  # noqa: BLE001 - closing must not raise past here
            log.exception("executor.close failed")

    def __enter__(self) -> "InferenceEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the loop (engine thread only) ----------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._jobs or self._running):
                    self._cond.wait()
                if self._closed:
                    break
                while self._waiting and len(self._running) < self.max_batch:
                    self._running.append(self._waiting.popleft())
                jobs = list(self._jobs)
                self._jobs.clear()
            try:
                self._run_jobs(jobs)
                self._drop_cancelled()
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a bug here must end requests, never hang them
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._finish(seq, None, error=f"internal error: {exc}")
        self._shutdown()

    def _call_on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("cannot wait for the engine loop from the engine thread (e.g. inside `recover`)")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._jobs.append((fn, fut))
            self._cond.notify_all()
        return fut.result()

    def _run_jobs(self, jobs: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
        for fn, fut in jobs:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(exc)

    def _install(self, executor: Executor, why: str) -> Executor:
        """Use `executor` from now on; every running sequence is re-fed from position 0 (its full history)."""
        old, self.executor = self.executor, executor
        for seq in self._running:
            seq.n_fed = 0
        self.replays += len(self._running)
        log.warning("%s: replaying %d running sequences onto the new executor", why, len(self._running))
        return old

    def _try_recover(self, exc: Exception) -> bool:
        if self._recover is None or self._failures_in_a_row >= self._max_recoveries:
            return False
        self._failures_in_a_row += 1
        try:
            new = self._recover(exc, self.executor)
        except Exception:  # noqa: BLE001 - a failed recovery falls back to failing the requests
            log.exception("executor recovery failed")
            return False
        if new is None:
            return False
        self._install(new, f"executor failed ({exc})")
        return True

    def _handed_off(self) -> bool:
        """Give every running and waiting sequence to `hand_off`; True when it took them (they are then gone
        from here, their caches with the failed executor)."""
        if self._hand_off is None:
            return False
        with self._cond:
            seqs = self._running + list(self._waiting)
        if not seqs:
            return False
        try:
            taken = self._hand_off(seqs)
        except Exception:  # noqa: BLE001 - no taker: the requests end with the step's error
            log.exception("handing sequences to another engine failed")
            return False
        if not taken:
            return False
        with self._cond:
            self._running = [s for s in self._running if s not in seqs]
            for seq in seqs:
                if seq in self._waiting:
                    self._waiting.remove(seq)
        log.warning("handed %d sequence(s) to another engine", len(seqs))
        return True

    def _drop_cancelled(self) -> None:
        with self._cond:
            for seq in [s for s in self._waiting if s.handle.cancelled]:
                self._waiting.remove(seq)
                self._end(seq, _final_chunk(seq, "cancel"))
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._finish(seq, "cancel")

    def _step(self) -> None:
        budget = self.max_step_tokens
        batch: list[_Seq] = []
        feeds: list[list[int]] = []
        now = time.perf_counter()
        # Decoding sequences first (one token each), then prompt chunks within the budget, oldest first.
        for seq in sorted(self._running, key=lambda s: len(s.pending) > 1):
            pending = seq.pending
            if len(pending) > 1:
                n = min(len(pending), seq.request.options.num_batch, budget)
                if n <= 0:
                    continue
                budget -= n
                pending = pending[:n]
            if seq.t_prefill_start is None:
                seq.t_prefill_start = now
            batch.append(seq)
            feeds.append(pending)
        if not batch:
            return
        sampled: list[int | None] | None = None
        try:
            sampled = self._step_sampled(batch, feeds)
            if sampled is None:
                logits = self.executor.step([s.seq_id for s in batch], feeds)
        except Exception as exc:  # noqa: BLE001 - an executor failure ends the requests it was running
            log.error("executor step failed for sequences %s: %s", [s.seq_id for s in batch], exc)
            if self._try_recover(exc):
                return
            if self._handed_off():
                return
            for seq in batch:
                self._finish(seq, None, error=f"model execution failed: {exc}")
            return
        self.steps += 1
        self._failures_in_a_row = 0
        now = time.perf_counter()
        ready: list[int] = []
        for i, (seq, fed) in enumerate(zip(batch, feeds)):
            seq.n_fed += len(fed)
            if seq.n_fed == len(seq.tokens):
                ready.append(i)
                if seq.t_prompt_done is None:
                    seq.t_prompt_done = now
        if not ready:
            return
        if sampled is not None:
            toks = [sampled[i] for i in ready]
        else:
            rows = logits[ready] if len(ready) != len(batch) else logits
            toks = sample_batch(rows, [batch[i].sampler for i in ready], [batch[i].tokens for i in ready])
        now = time.perf_counter()
        for i, tok in zip(ready, toks):
            self._accept(batch[i], tok, now, len(batch))

    def _step_sampled(self, batch: list[_Seq], feeds: list[list[int]]) -> list[int | None] | None:
        """Run the step on an executor that samples where the logits are (RayExecutor.step_sampled: its last
        stage samples, grammar constraints and logprobs included, and returns token ids); None when it does not.
        An executor opts in by defining `step_sampled` on its class: a wrapper that forwards attributes does not
        count, since what it does in `step` (delay it, change the logits) would be bypassed."""
        if getattr(type(self.executor), "step_sampled", None) is None:
            return None
        due = [s.n_fed + len(fed) == len(s.tokens) for s, fed in zip(batch, feeds)]
        return self.executor.step_sampled([s.seq_id for s in batch], feeds,
                                          [s.sampler if d else None for s, d in zip(batch, due)],
                                          [s.tokens if d else None for s, d in zip(batch, due)])

    def _accept(self, seq: _Seq, tok: int, now: float, batch: int) -> None:
        """Handle one sampled token: emit text, and end the sequence when a stop condition holds."""
        seq.t_last_token = now
        limit = seq.request.options.num_predict
        if 0 <= limit <= seq.n_generated:  # num_predict 0: prompt evaluation only
            self._finish(seq, "length")
            return
        if tok in self.eos_ids:
            self._finish(seq, "stop")
            return
        seq.tokens.append(tok)
        seq.generated.append(tok)
        seq.n_generated += 1
        text, stopped = seq.stop.push(seq.decoder.feed(tok))
        if text or not stopped:
            lp = seq.sampler.last_logprobs
            seq.handle._push(GenerationChunk(text=text, token_ids=[tok], time=now, batch=batch,
                                             logprobs=(lp,) if lp is not None else ()))
        if stopped:
            self._finish(seq, "stop")
        elif 0 <= limit <= seq.n_generated:
            self._finish(seq, "length")
        elif len(seq.tokens) >= seq.num_ctx and not (seq.request.shift and self._shift_context(seq)):
            self._finish(seq, "length")

    def _shift_context(self, seq: _Seq) -> bool:
        """Ollama's context shift (runner `ShiftContext`): keep the first num_keep tokens, drop half of the rest,
        continue. The executor's cache is rebuilt by replaying the shortened history (RoPE positions change)."""
        if seq.request.options.num_predict == -2:  # "fill the context" means stop when it is full
            return False
        keep = min(max(seq.request.options.num_keep, 0), seq.num_ctx - 1)
        discard = (len(seq.tokens) - keep) // 2
        if discard <= 0:
            return False
        seq.tokens = seq.tokens[:keep] + seq.tokens[keep + discard :]
        self.executor.free(seq.seq_id)
        seq.n_fed = 0
        log.debug("context shift for sequence %d: kept %d, discarded %d", seq.seq_id, keep, discard)
        return True

    def _finish(self, seq: _Seq, reason: str | None, error: str | None = None) -> None:
        """Free the sequence everywhere and send its final chunk (after any text still held back)."""
        if seq in self._running:
            self._running.remove(seq)
        try:
            self.executor.free(seq.seq_id)
        except Exception:  # noqa: BLE001 - a failed free must not keep the request open
            log.exception("executor.free(%d) failed", seq.seq_id)
        if error is None and reason in ("length", "stop"):
            tail = seq.stop.flush() + _decoder_flush(seq.decoder)
            if tail:
                seq.handle._push(GenerationChunk(text=tail, token_ids=[], time=time.perf_counter()))
        self._end(seq, _final_chunk(seq, reason, error))

    def _end(self, seq: _Seq, chunk: GenerationChunk) -> None:
        seq.handle._push(chunk)

    def _shutdown(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
        for seq in waiting + list(self._running):
            self._finish(seq, None, error="the engine was closed")
        for _, fut in jobs:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineClosedError("the engine was closed"))


def _final_chunk(seq: _Seq, reason: str | None, error: str | None = None) -> GenerationChunk:
    """The closing chunk of a sequence, with its metrics."""
    now = time.perf_counter()
    start = seq.t_prefill_start if seq.t_prefill_start is not None else now
    prompt_done = seq.t_prompt_done if seq.t_prompt_done is not None else now
    last = seq.t_last_token if seq.t_last_token is not None else prompt_done
    return GenerationChunk(
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
        time=now,
    )


def _make_decoder(tokenizer: Any) -> Any:
    """A streaming detokeniser (model/tokenizer.py IncrementalDecoder: never splits a UTF-8 character; special
    tokens such as <|im_end|> produce no text, as in Ollama's output)."""
    return tokenizer.incremental_decoder()


def _decoder_flush(decoder: Any) -> str:
    flush = getattr(decoder, "flush", None)
    return flush() if callable(flush) else ""

