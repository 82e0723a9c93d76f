"""Our `model.tokenizer.Tokenizer` as llguidance's `LLTokenizer`.

llguidance needs every token's bytes, the EOS ids and an encoder (llguidance `TokenizerWrapper`); our tokenizer
already has the exact bytes of each id (`token_bytes`, byte-level BPE and SentencePiece alike), so no
`tokenizers` JSON round trip is needed. Special (control) tokens are marked special so the grammar never spells
text with them. Building takes ~0.1 s for a 49k vocabulary, so the result is cached per tokenizer object.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import llguidance

_CACHE: "weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class _TokenTable:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads (eos/bos ids, token bytes, an encoder)."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        special = set(getattr(tok, "special_ids", ()) or ())
        self.special_token_ids = sorted(special)
        eos = sorted(getattr(tok, "eos_ids", ()) or ())
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else (eos[0] if eos else 0)
        self.bos_token_id = tok.bos_id
        # Special tokens keep their spelling (llguidance prefixes it with 0xFF internally, so it never matches text).
        self.tokens = [(tok.id_to_token(i) or "").encode() if i in special else tok.token_bytes(i)
                       for i in range(tok.vocab_size)]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tok.encode(text, add_bos=False))


def grammar_tokenizer(tok: Any) -> llguidance.LLTokenizer:
    """The LLTokenizer for `tok` (built once per tokenizer object)."""
    with _LOCK:
        cached = _CACHE.get(tok)
        if cached is None:
            eos = sorted(getattr(tok, "eos_ids", ()) or ()) or None
            cached = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTable(tok)), n_vocab=tok.vocab_size,
                                            eos_token=eos)
            _CACHE[tok] = cached
        return cached


_CHAR_IDS: "weakref.WeakKeyDictionary[Any, dict[bytes, int]]" = weakref.WeakKeyDictionary()


def single_byte_tokens(tok: Any) -> dict[bytes, int]:
    """Token id of each printable ASCII character that is a token of its own (first such id)."""
    with _LOCK:
        table = _CHAR_IDS.get(tok)
        if table is None:
            special = set(getattr(tok, "special_ids", ()) or ())
            table = {}
            for i in range(tok.vocab_size):
                if i in special:
                    continue
                b = tok.token_bytes(i)
                if len(b) == 1 and 0x20 <= b[0] < 0x7F and b not in table:
                    table[b] = i
            _CHAR_IDS[tok] = table
        return table
