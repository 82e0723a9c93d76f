"""`format: "json"` / JSON-schema formats: constrained decoding that guarantees a valid JSON object.

How: an executor wrapper (`ConstrainedExecutor`) sits between the engine and the real executor. For a sequence
registered with a constraint it masks each step's logits so that only tokens keeping the text a valid JSON prefix
survive (a character-level pushdown automaton, `JsonState`), checked over the top candidates by logit; EOS is
allowed only once the object is complete, and then it is the only choice. When the remaining token budget
(num_predict / num_ctx) gets close to what is needed to close the open strings and containers, only tokens of the
shortest completion are allowed, so the output is valid JSON even when generation is cut short.
The tokens the engine samples reach the wrapper as the next step's input, which is how it advances the automaton
without a hook in the engine. As in llama.cpp's json.gbnf (which Ollama uses for "json"), the root is an object
and whitespace runs outside strings are bounded. A JSON schema is honoured only as far as "valid JSON object";
its properties are not enforced (documented gap).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

_WS = " \t\n\r"
_MAX_WS_RUN = 8
_LITERALS = ("true", "false", "null")

# Modes of the automaton.
VALUE, KEY_OR_END, KEY, COLON, AFTER, STRING, ESCAPE, UNICODE, NUMBER, LITERAL, DONE, START = range(12)


@dataclass(frozen=True)
class JsonState:
    """Immutable automaton state. stack: open containers ('{' / '['); for STRING, `aux` marks a key; for
    UNICODE, hex digits still to read; for NUMBER, the number text so far; for LITERAL, the rest to match."""

    mode: int = START
    stack: tuple[str, ...] = ()
    aux: Any = None
    ws_run: int = 0

    def feed(self, text: str) -> "JsonState | None":
        state: JsonState | None = self
        for ch in text:
            state = state._step(ch)  # type: ignore[union-attr]
            if state is None:
                return None
        return state

    def _after_value(self) -> "JsonState":
        return JsonState(DONE if not self.stack else AFTER, self.stack)

    def _step(self, ch: str) -> "JsonState | None":
        m, st = self.mode, self.stack
        if m == STRING:
            if ch == '"':
                return JsonState(COLON, st) if self.aux else self._after_value()
            if ch == "\\":
                return JsonState(ESCAPE, st, self.aux)
            return None if ord(ch) < 0x20 else self
        if m == ESCAPE:
            if ch in '"\\/bfnrt':
                return JsonState(STRING, st, self.aux)
            return JsonState(UNICODE, st, (self.aux, 4)) if ch == "u" else None
        if m == UNICODE:
            is_key, left = self.aux
            if ch not in "0123456789abcdefABCDEF":
                return None
            return JsonState(STRING, st, is_key) if left == 1 else JsonState(UNICODE, st, (is_key, left - 1))
        if m == NUMBER:
            num = self.aux + ch
            if _valid_number_prefix(num):
                return JsonState(NUMBER, st, num)
            if not _complete_number(self.aux):
                return None
            return self._after_value()._step(ch)
        if m == LITERAL:
            if ch != self.aux[0]:
                return None
            return self._after_value() if len(self.aux) == 1 else JsonState(LITERAL, st, self.aux[1:])
        if ch in _WS:
            # json.gbnf's root is the object itself: no whitespace before it or after it.
            if m in (DONE, START) or self.ws_run >= _MAX_WS_RUN:
                return None
            return JsonState(m, st, self.aux, self.ws_run + 1)
        if self.ws_run:
            return JsonState(m, st, self.aux)._step(ch)
        if m == START:
            return JsonState(KEY_OR_END, ("{",)) if ch == "{" else None
        if m == DONE:
            return None
        if m in (KEY_OR_END, KEY):
            if ch == '"':
                return JsonState(STRING, st, True)
            if ch == "}" and m == KEY_OR_END:
                return JsonState(DONE if len(st) == 1 else AFTER, st[:-1])
            return None
        if m == COLON:
            return JsonState(VALUE, st) if ch == ":" else None
        if m == AFTER:
            if ch == ",":
                return JsonState(KEY if st[-1] == "{" else VALUE, st)
            if (ch == "}" and st[-1] == "{") or (ch == "]" and st[-1] == "["):
                return JsonState(DONE if len(st) == 1 else AFTER, st[:-1])
            return None
        if m == VALUE:
            if ch == "{":
                return JsonState(KEY_OR_END, st + ("{",))
            if ch == "[":
                return JsonState(VALUE, st + ("[",), "array-start")
            if ch == "]" and self.aux == "array-start":
                return JsonState(DONE if len(st) == 1 else AFTER, st[:-1])
            if ch == '"':
                return JsonState(STRING, st, False)
            if ch == "-" or ch.isdigit():
                return JsonState(NUMBER, st, ch)
            for lit in _LITERALS:
                if ch == lit[0]:
                    return JsonState(LITERAL, st, lit[1:])
            return None
        return None

    @property
    def done(self) -> bool:
        return self.mode == DONE

    def completion(self) -> str:
        """The shortest text that turns this prefix into a complete JSON object."""
        m, out = self.mode, ""
        if m == START:
            return "{}"
        is_key = self.aux[0] if m == UNICODE else self.aux is True
        if m == ESCAPE:
            out, m = "n", STRING
        if m == UNICODE:
            out, m = "0" * self.aux[1], STRING
        if m == STRING:
            out += '"' + (":null" if is_key else "")
        elif m == NUMBER:
            out += "" if _complete_number(self.aux) else "0"
        elif m == LITERAL:
            out += self.aux
        elif m == COLON:
            out += ":null"
        elif m == KEY:
            out += '"":null'
        elif m == VALUE and self.aux != "array-start":
            out += "null"
        return out + "".join("}" if c == "{" else "]" for c in reversed(self.stack))


def _valid_number_prefix(s: str) -> bool:
    # JSON number grammar (RFC 8259 §6) as a prefix check.
    import re

    return re.fullmatch(r"-?(0|[1-9]\d*)?(\.\d*)?([eE][+-]?\d*)?", s) is not None and _prefix_ok(s)


def _prefix_ok(s: str) -> bool:
    body = s[1:] if s.startswith("-") else s
    if not body:
        return True
    if body[0] == "0" and len(body) > 1 and body[1].isdigit():
        return False
    if body[0] in ".eE":
        return False
    if "." in body:
        ipart, rest = body.split(".", 1)
        if rest[:1] in ("e", "E"):
            return False
    return True


def _complete_number(s: str) -> bool:
    import re

    return re.fullmatch(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?", s) is not None


@dataclass
class _Constraint:
    n_prompt: int
    budget: int  # tokens this sequence may still generate
    state: JsonState = field(default_factory=JsonState)
    fed: int = 0


class TokenTexts:
    """Decoded text of every vocabulary entry (computed once per tokenizer)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.texts: list[str] = []
        special = set(getattr(tokenizer, "special_ids", ()) or ())
        for i in range(vocab_size):
            try:
                # Bytes, not decode(): a byte-level token holding part of a UTF-8 character decodes to U+FFFD,
                # which is only ever accepted inside a string.
                text = "" if i in special else tokenizer.token_bytes(i).decode("utf-8", errors="replace")
            except Exception:  # noqa: BLE001 - ids past the tokenizer's table decode to nothing usable
                text = ""
            self.texts.append(text)
        self.eos_ids = sorted(getattr(tokenizer, "eos_ids", ()) or ())


class ConstrainedExecutor:
    """Wraps an Executor; masks logits of registered sequences (see module docstring). Other calls pass through."""

    SCAN = 4096  # candidates examined per step, by logit
    KEEP = 64  # valid candidates kept for the sampler

    def __init__(self, inner: Any, tokenizer: Any) -> None:
        self.inner = inner
        self.tokenizer = tokenizer
        self.lock = threading.Lock()  # held by the API around submit+register, and by step
        self._constraints: dict[int, _Constraint] = {}
        self._texts: TokenTexts | None = None
        self._live: set[int] = set()  # sequences whose KV cache the executor holds (stepped, not yet freed)

    @property
    def live_sequences(self) -> int:
        """KV caches currently held: observable proof that cancelled/finished sequences were freed."""
        return len(self._live)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def max_seq_len(self) -> int:
        return self.inner.max_seq_len

    def register(self, seq_id: int, n_prompt: int, budget: int) -> None:
        """Constrain `seq_id` (call with `self.lock` held, right after engine.submit)."""
        if self._texts is None:
            self._texts = TokenTexts(self.tokenizer, self.inner.config.vocab_size)
        self._constraints[seq_id] = _Constraint(n_prompt=n_prompt, budget=max(1, budget))

    def rebind(self, inner: Any) -> None:
        """Serve from a fresh `inner` executor after a failure. The engine replays every sequence from position
        0, so each constraint restarts from its initial state with the budget it had before generating."""
        with self.lock:
            self.inner = inner
            self._live.clear()
            for sid, c in list(self._constraints.items()):
                self._constraints[sid] = _Constraint(n_prompt=c.n_prompt,
                                                     budget=c.budget + max(0, c.fed - c.n_prompt))

    def step(self, seq_ids: list[int], tokens: list[list[int]]) -> torch.Tensor:
        with self.lock:
            self._live.update(seq_ids)
            logits = self.inner.step(seq_ids, tokens)
            if not any(sid in self._constraints for sid in seq_ids):
                return logits
            logits = logits.clone()  # executors may return inference-mode tensors, which cannot be edited
            for row, (sid, fed) in enumerate(zip(seq_ids, tokens)):
                c = self._constraints.get(sid)
                if c is None:
                    continue
                self._advance(c, fed)
                if c.fed >= c.n_prompt:
                    logits[row] = self._mask(c, logits[row])
            return logits

    def _advance(self, c: _Constraint, fed: list[int]) -> None:
        assert self._texts is not None
        for tok in fed:
            c.fed += 1
            if c.fed > c.n_prompt:
                nxt = c.state.feed(self._texts.texts[tok])
                if nxt is None:  # cannot happen for tokens we allowed; keep the old state rather than crash
                    log.warning("constrained sequence fed a token outside the JSON grammar: %r", self._texts.texts[tok])
                else:
                    c.state = nxt
                c.budget -= 1

    def _mask(self, c: _Constraint, row: torch.Tensor) -> torch.Tensor:
        texts = self._texts
        assert texts is not None
        out = torch.full_like(row, float("-inf"))
        if c.state.done:
            for e in texts.eos_ids:
                out[e] = row[e]
            return out
        completion = c.state.completion()
        if c.budget <= len(completion) + 2:
            # Closing mode: the shortest completion, one token at a time (characters are always tokens in a
            # byte-level BPE, so this always fits in the budget the completion's length allows).
            tok = self._token_for_prefix(completion)
            out[tok] = 0.0
            return out
        order = torch.topk(row, min(self.SCAN, row.numel())).indices.tolist()
        kept = 0
        for tok in order:
            text = texts.texts[tok]
            if tok in texts.eos_ids or not text or "\ufffd" in text and c.state.mode != STRING:
                continue
            nxt = c.state.feed(text)
            # Keep only tokens after which the object can still be closed within the remaining budget.
            if nxt is not None and len(nxt.completion()) <= c.budget - 3:
                out[tok] = row[tok]
                kept += 1
                if kept >= self.KEEP:
                    break
        if kept == 0:
            out[self._token_for_prefix(completion)] = 0.0
        return out

    def _token_for_prefix(self, completion: str) -> int:
        """A token whose text is a prefix of `completion` (the longest among the tokenizer's encoding's first)."""
        assert self._texts is not None
        ids = self.tokenizer.encode(completion, add_bos=False)
        if ids and completion.startswith(self._texts.texts[ids[0]]) and self._texts.texts[ids[0]]:
            return ids[0]
        for i, t in enumerate(self._texts.texts):
            if t == completion[0]:
                return i
        raise RuntimeError(f"no token spells {completion[0]!r}")

    def free(self, seq_id: int) -> None:
        with self.lock:
            self._constraints.pop(seq_id, None)
            self._live.discard(seq_id)
        self.inner.free(seq_id)

    def embed(self, tokens: list[int]) -> torch.Tensor:
        return self.inner.embed(tokens)

    def close(self) -> None:
        self.inner.close()


def validate_format(fmt: Any) -> str | dict | None:
    """The request's `format`: "json", a JSON-schema object, or ""/None (none). Raises ValueError otherwise
    (Ollama's `invalid format`)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return "json"
    if isinstance(fmt, dict):
        return fmt
    raise ValueError(f'invalid format: {fmt!r}: expected "json" or a JSON schema object')
