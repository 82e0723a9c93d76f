"""`GrammarConstraint`: the sampler's per-step view of an llguidance matcher (model.sampling.TokenConstraint).

Each step the sampler asks `allowed_mask(vocab)` and then calls `advance(token)` with what it drew. The object is
self-contained (grammar text, tokenizer, budget, tokens consumed) and picklable, so it can be shipped with the
sampler to wherever sampling runs; unpickling rebuilds the matcher and replays the tokens.

Budget: a request that stops at num_predict (or a full context) in the middle of an object would return broken
JSON. When the tokens left reach what closing the open strings and containers needs, the mask keeps only the
allowed single-character tokens that close fastest (a quote inside a string, then `}` / `]`, then a one-digit
value), as the hand-written automaton this replaces did. This always closes "json" (any object); a schema whose
required members cannot fit in the budget can still end cut short (done_reason "length").
"""

from __future__ import annotations

from typing import Any

import llguidance
import llguidance.numpy as llg_np
import numpy as np
import torch

from .tokenizer import grammar_tokenizer, single_byte_tokens

# Closing preference outside a string: containers first, then the shortest values.
_CLOSERS = [b"}", b"]", *[bytes([c]) for c in b"0123456789"], b'"', b":", b",", b"n", b"u", b"l", b"t", b"r",
            b"e", b"f", b"a", b"s", b"[", b"{", b"-", b"."]


class ReplayedOnUnpickle:
    """Pickling for a constraint over a compiled matcher (which does not pickle): keep its grammar, tokenizer,
    budget and the tokens consumed, and rebuild it where the sampler lands by replaying them."""

    grammar: Any
    tokenizer: Any
    budget: int | None
    consumed: list[int]

    def __getstate__(self) -> dict[str, Any]:
        return {"grammar": self.grammar, "tokenizer": self.tokenizer, "budget": self.budget,
                "consumed": list(self.consumed)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["grammar"], state["tokenizer"], state["budget"])  # type: ignore[misc]
        for t in state["consumed"]:
            self.advance(t)  # type: ignore[attr-defined]


class GrammarConstraint(ReplayedOnUnpickle):
    """Tokens allowed by `grammar` (llguidance grammar text, from schema.py) for one sequence.

    tokenizer: the model's `model.tokenizer.Tokenizer`; budget: tokens this sequence may generate (None:
    unbounded), which enables closing mode near its end.
    """

    def __init__(self, grammar: str, tokenizer: Any, budget: int | None = None) -> None:
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.budget = budget
        self.consumed: list[int] = []
        self._llt = grammar_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(self._llt, grammar)
        if self._matcher.is_error():
            raise ValueError(f"grammar rejected: {self._matcher.get_error()}")
        self._bits = llg_np.allocate_token_bitmask(1, self._llt.vocab_size)
        self._eos = sorted(getattr(tokenizer, "eos_ids", ()) or ()) or [self._llt.eos_token]
        # JSON scan of the output so far (for closing mode): open containers, inside a string, after a backslash.
        self._stack: list[int] = []
        self._in_string = False
        self._escape = False

    # ---- TokenConstraint --------------------------------------------------------------------------------------

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        # numpy, then one zero-copy torch view: small torch ops cost milliseconds on a busy CPU (thread pool
        # wake-ups), numpy's microseconds.
        out = np.zeros(vocab_size, dtype=np.bool_)
        eos = [e for e in self._eos if e < vocab_size]
        if self._matcher.is_error():  # cannot happen for tokens this mask allowed; end the answer rather than loop
            out[eos] = True
            return torch.from_numpy(out)
        llg_np.fill_next_token_bitmask(self._matcher, self._bits)
        n = min(vocab_size, self.tokenizer.vocab_size)
        out[:n] = np.unpackbits(self._bits[0].view(np.uint8), count=n, bitorder="little").view(np.bool_)
        if self._closing():
            narrowed = self._closing_choice(out)
            if narrowed is not None:
                out[:] = False
                out[narrowed] = True
        if not out.any():
            out[eos] = True
        return torch.from_numpy(out)

    def advance(self, token: int) -> None:
        self.consumed.append(int(token))
        if token in self._eos and self._matcher.is_accepting():
            self._matcher.consume_token(self._llt.eos_token)
            return
        self._matcher.consume_token(int(token))
        if token < self.tokenizer.vocab_size:
            self._scan(self.tokenizer.token_bytes(int(token)))

    # ---- state ------------------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The grammar is complete: only end-of-generation is allowed now."""
        return self._matcher.is_stopped() or self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    def _scan(self, data: bytes) -> None:
        # RFC 8259 lexical structure, just enough to count what is open.
        for c in data:
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_string = False
            elif c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):
                self._stack.append(c)
            elif c in (0x7D, 0x5D) and self._stack:
                self._stack.pop()

    def _closing(self) -> bool:
        if self.budget is None:
            return False
        left = self.budget - len(self.consumed)
        # Worst case per level: end a string, ':' and a one-token value for a key, then the closer.
        return left <= len(self._stack) + 4

    def _closing_choice(self, allowed: np.ndarray) -> int | None:
        ids = single_byte_tokens(self.tokenizer)
        order = ([b'"'] if self._in_string and not self._escape else []) + _CLOSERS
        for ch in order:
            tid = ids.get(ch)
            if tid is not None and tid < allowed.size and allowed[tid]:
                return tid
        forced = self._matcher.compute_ff_tokens()
        return forced[0] if forced else None

