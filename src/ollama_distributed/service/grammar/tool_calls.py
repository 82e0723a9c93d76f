"""`ToolCallConstraint`: with tools on offer the model may answer in prose or call a tool; when it starts a tool
call (its first non-blank output is `{`, the shape Llama-3-style templates and `parse_tool_calls` use), the
rest must be a valid call of one of the tools, {"name": NAME, "arguments": {...per the tool's parameters}}.

A lazy grammar: while only whitespace has been written, a token that would open an object is allowed only if the
tool-call grammar allows it; any other first token leaves the answer free (prose, or a tool call in a
template's own tags, which `parse_tool_calls` still reads). Once an object is opened, a `GrammarConstraint` on the
tool-call grammar decides every further token. Same protocol as GrammarConstraint (model.sampling.TokenConstraint),
picklable the same way.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
import torch

from .constraint import GrammarConstraint, ReplayedOnUnpickle

PENDING, GRAMMAR, FREE = "pending", "grammar", "free"

_CLASSES: "weakref.WeakKeyDictionary[Any, tuple[np.ndarray, np.ndarray]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _token_classes(tok: Any) -> tuple[np.ndarray, np.ndarray]:
    """(opens_object, blank): per token id, whether its text starts with `{` after leading whitespace, and
    whether it is all whitespace (computed once per tokenizer)."""
    with _LOCK:
        cached = _CLASSES.get(tok)
        if cached is None:
            special = set(getattr(tok, "special_ids", ()) or ())
            opens = np.zeros(tok.vocab_size, dtype=np.bool_)
            blank = np.zeros(tok.vocab_size, dtype=np.bool_)
            for i in range(tok.vocab_size):
                if i in special:
                    continue
                b = tok.token_bytes(i)
                s = b.lstrip()
                opens[i] = s.startswith(b"{")
                blank[i] = bool(b) and not s
            cached = _CLASSES[tok] = (opens, blank)
        return cached


class ToolCallConstraint(ReplayedOnUnpickle):
    """grammar: the tool-call grammar (schema.compile_tool_calls); tokenizer, budget: as GrammarConstraint."""

    def __init__(self, grammar: str, tokenizer: Any, budget: int | None = None) -> None:
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.budget = budget
        self.consumed: list[int] = []
        self.mode = PENDING
        self._call = GrammarConstraint(grammar, tokenizer, budget)
        self._opens, self._blank = _token_classes(tokenizer)

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        if self.mode == GRAMMAR:
            return self._call.allowed_mask(vocab_size)
        out = np.ones(vocab_size, dtype=np.bool_)
        if self.mode == PENDING:
            n = min(vocab_size, self._opens.size)
            call_ok = self._call.allowed_mask(vocab_size).numpy()
            # an object may only be opened by a token the tool-call grammar accepts as its start
            out[:n] &= ~self._opens[:n] | call_ok[:n]
        return torch.from_numpy(out)

    def advance(self, token: int) -> None:
        self.consumed.append(int(token))
        if self.mode == GRAMMAR:
            self._call.advance(token)
        elif self.mode == PENDING and token < self._opens.size:
            if self._opens[token]:
                self.mode = GRAMMAR
                # the call's budget counts from here
                if self._call.budget is not None:
                    self._call.budget -= len(self.consumed) - 1
                self._call.advance(token)
            elif not self._blank[token]:
                self.mode = FREE
