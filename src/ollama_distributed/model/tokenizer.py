"""Tokenizer built from a GGUF file's metadata (or an HF `tokenizer.json`), ids identical to transformers'.

A GGUF carries no `tokenizer.json`, only llama.cpp's `tokenizer.ggml.*` fields. We assemble a `tokenizers`
(Rust) pipeline from them rather than hand-rolling BPE:

- "gpt2" (byte-level BPE: SmolLM2, Llama 3, Qwen2): BPE over byte-alphabet tokens with the file's merges; the
  split regex chosen by `tokenizer.ggml.pre`; ByteLevel decoding. Control tokens (type 3) are added as special
  tokens and user-defined ones (type 4) as plain added tokens, so both are matched whole in text.
- "llama" (SentencePiece BPE: Llama 2, Mistral): the pieces as vocabulary, merges recovered from the piece
  scores, byte fallback (`<0xNN>` pieces), `▁` for spaces with one prepended to the text.

These choices mirror transformers' GGUF tokenizer conversion (integrations/gguf/gguf_tokenizer_mapping.py,
GPT2Tokenizer, LlamaTokenizer), because the engine is checked token-for-token against transformers. Where that
conversion and llama.cpp disagree we follow transformers: e.g. pre type "smollm" gets the GPT-2 split regex,
while llama.cpp (and SmolLM2's own tokenizer.json) first isolate every digit, which changes ids only for
whitespace directly before a digit ("  2" → [" ", " 2"→"Ġ","2"] here vs ["ĠĠ","2"] there).
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .chat_template import family_template
from .errors import ModelFileError

log = logging.getLogger(__name__)

# llama.cpp token types (llama.h `llama_token_type`).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn / end-of-generation tokens that chat models emit instead of (or besides) their eos token.
# llama.cpp treats the same spellings as end-of-generation (llama-vocab.cpp, special_eog_ids).
_EOG_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<EOT>",
               "<|end_of_text|>", "</s>")

# Split regexes by `tokenizer.ggml.pre` (the patterns of the models' own tokenizer.json files, also listed in
# llama.cpp's llama-vocab.cpp). Pre types not listed use the GPT-2 regex built into ByteLevel, as transformers does.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEXES: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "tekken": _TEKKEN,
}


class TokenizerError(ValueError):
    """The tokenizer description is missing or inconsistent; the message names what."""


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (openai/gpt-2 encoder.py `bytes_to_unicode`).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order, to U+0100 onwards.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces.

    Ordered the way transformers orders them (tokenization_utils_base.generate_merges): by the merged piece's
    score, highest first, then longer left part, then longer right part; ties keep piece order, and within a
    piece its splits are ordered by (left id, right id).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    cands: list[tuple[str, str, float]] = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        cands.extend(local)
    cands.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in cands]


class Tokenizer:
    """Text ↔ token ids for one model. Build with `from_gguf`, `from_metadata` or `from_hf_dir`.

    Attributes: bos_id / eos_id / pad_id (None when absent), eos_ids (every id that ends generation),
    add_bos (default for `encode`), vocab_size, special_ids (control tokens), chat_template (None if absent),
    bos_token / eos_token (their text, "" if absent).
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_eos: bool = False,
        pad_id: int | None = None,
        extra_eos_ids: Iterable[int] = (),
        special_ids: Iterable[int] = (),
        byte_level: bool = True,
        strip_leading_space: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._tk = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(special_ids) | {i for i in (bos_id, eos_id) if i is not None}
        eos = {i for i in extra_eos_ids if 0 <= i < self.vocab_size}
        if eos_id is not None:
            eos.add(eos_id)
        for text in _EOG_TOKENS:
            tid = backend.token_to_id(text)
            if tid is not None:
                eos.add(tid)
        self.eos_ids: set[int] = eos
        self.chat_template = chat_template
        self._byte_level = byte_level
        self._strip_leading_space = strip_leading_space
        self._bytes: list[bytes] | None = None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Tokenizer of a GGUF file (ModelFileError when the file is unreadable or has no tokenizer)."""
        from .weights import read_metadata  # GGUF reading and its typed errors live there

        meta = read_metadata(path)
        try:
            return cls.from_metadata(meta)
        except TokenizerError as exc:
            raise ModelFileError(path, str(exc)) from None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Tokenizer from GGUF key/values (plain Python values, as `weights.read_metadata` returns)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise TokenizerError("no tokenizer in metadata (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
        tokens = list(tokens)
        types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

        def tid(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            if v is None:
                return None
            if not 0 <= int(v) < len(tokens):
                raise TokenizerError(f"tokenizer.ggml.{key} = {v} is outside the vocabulary of {len(tokens)}")
            return int(v)

        if kind == "gpt2":
            backend, byte_level, strip = _byte_level_bpe(tokens, types, meta), True, False
            add_bos_default = False  # GPT2Tokenizer's default, as in transformers' conversion
        elif kind == "llama":
            # Gemma's vocabulary says add_space_prefix = false (no "▁" before the text; llama.cpp's
            # llama_vocab and transformers' GGUFGemmaConverter both honour it); Llama 2 / Mistral default to true.
            strip = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            backend, byte_level = _sentencepiece_bpe(tokens, types, meta, strip), False
            add_bos_default = True  # llama.cpp and transformers add BOS to SentencePiece vocabularies by default
        else:
            raise TokenizerError(f"tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")
        extra_eos = [i for i in (tid("eot_token_id"), tid("eom_token_id")) if i is not None]
        return cls(
            backend,
            bos_id=tid("bos_token_id"),
            eos_id=tid("eos_token_id"),
            pad_id=tid("padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            extra_eos_ids=extra_eos,
            special_ids=[i for i, t in enumerate(types) if t == _CONTROL],
            byte_level=byte_level,
            strip_leading_space=strip,
            chat_template=family_template(meta),
        )

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> "Tokenizer":
        """Tokenizer of an HF model directory: tokenizer.json plus tokenizer_config.json / generation_config.json."""
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise ModelFileError(d, "no tokenizer.json in the model directory")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ModelFileError(path, f"unreadable tokenizer.json ({exc})") from None
        conf = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        model_conf = _read_json(d / "config.json")

        def token_id(name: str) -> int | None:
            tok = conf.get(name)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return backend.token_to_id(tok) if isinstance(tok, str) else None

        bos_id = token_id("bos_token")
        eos_id = token_id("eos_token")
        extra_eos: list[int] = []
        for src in (gen, model_conf):
            ids = src.get("eos_token_id")
            extra_eos += ids if isinstance(ids, list) else ([ids] if isinstance(ids, int) else [])
            if bos_id is None and isinstance(src.get("bos_token_id"), int):
                bos_id = src["bos_token_id"]
        if eos_id is None and extra_eos:
            eos_id = extra_eos[0]
        # The post-processor (e.g. Llama 3's TemplateProcessing) is where HF adds BOS; we add it ourselves
        # so that `encode(add_bos=...)` controls it, and disable the backend's copy.
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = conf.get("add_bos_token", bos_id is not None and bool(probe) and probe[0] == bos_id)
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        byte_level = "ByteLevel" in json.dumps(decoder)
        strip = '"Strip"' in json.dumps(decoder)
        template = conf.get("chat_template")
        if template is None and (d / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it apart
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]
        return cls(backend, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos), extra_eos_ids=extra_eos,
                   special_ids=special, byte_level=byte_level, strip_leading_space=strip, chat_template=template)

    # ---- text ↔ ids --------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token spellings in the text (e.g. "<|im_start|>") become their ids.

        add_bos/add_eos: None = the model's default (`tokenizer.ggml.add_bos_token`).
        """
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        return [self.encode(t, add_bos) for t in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD). skip_special drops control tokens (bos, eos, <|im_end|>)."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    @property
    def bos_token(self) -> str:
        return (self.id_to_token(self.bos_id) or "") if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return (self.id_to_token(self.eos_id) or "") if self.eos_id is not None else ""

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for in decoded text (before the leading-space strip)."""
        if self._bytes is None:
            self._bytes = self._build_byte_table()
        return self._bytes[token_id]

    def incremental_decoder(self, skip_special: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special=skip_special)

    def _build_byte_table(self) -> list[bytes]:
        added = {i for i in self._tk.get_added_tokens_decoder()}
        inverse = {c: b for b, c in byte_alphabet().items()}
        table: list[bytes] = []
        for i in range(self.vocab_size):
            tok = self._tk.id_to_token(i) or ""
            if self._byte_level:
                # tokenizers' ByteLevel decoder: map every char back to its byte; a token holding a character
                # outside the byte alphabet is passed through as its own UTF-8.
                try:
                    table.append(bytes(inverse[c] for c in tok))
                except KeyError:
                    table.append(tok.encode("utf-8"))
            elif i not in added and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                table.append(bytes([int(tok[3:5], 16)]))  # SentencePiece byte-fallback piece
            else:
                table.append(tok.replace("▁", " ").encode("utf-8"))
        return table


class IncrementalDecoder:
    """Streaming detokenizer: feed ids as they are generated, get text that never splits a UTF-8 character.

    Works on bytes (`Tokenizer.token_bytes`) with Python's incremental UTF-8 decoder, which holds back an
    incomplete multi-byte sequence until its last byte arrives, so the concatenation of everything returned
    by `feed` and `flush` equals `tokenizer.decode(all_ids, skip_special)` for valid UTF-8 output.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # for SentencePiece's single leading-space strip

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Text completed by these tokens ("" while a character is still incomplete)."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        tk = self.tokenizer
        data = b"".join(
            tk.token_bytes(i) for i in ids if not (self.skip_special and i in tk.special_ids)
        )
        if not data:
            return ""
        if not self._started:
            self._started = True
            # The SentencePiece decoder strips one space from the very start of the text (the one it prepended).
            if tk._strip_leading_space and data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _byte_level_bpe(tokens: list[str], types: list[int], meta: Mapping[str, Any]) -> _HFTokenizer:
    alphabet = set(byte_alphabet().values())
    spell = byte_alphabet()
    # Tokens must be spelled in the byte alphabet for the BPE model; a token stored as raw text (a llama.cpp
    # conversion quirk) is respelled from its UTF-8 bytes, as transformers does.
    vocab = {
        (t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise TokenizerError("byte-level BPE tokenizer without tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise TokenizerError(f"malformed merge {bad!r} in tokenizer.ggml.merges")
    tk = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                                 fuse_unk=False, dropout=None))
    regex = PRE_TOKENIZER_REGEXES.get(str(meta.get("tokenizer.ggml.pre", "")))
    if regex is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tk.decoder = decoders.ByteLevel()
    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels; adding them would grow the vocab.
    _add_special(tk, tokens, types, lambda t: set(t) <= alphabet)
    return tk


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: Mapping[str, Any],
                       space_prefix: bool = True) -> _HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise TokenizerError("SentencePiece tokenizer needs tokenizer.ggml.scores (one per token) or merges")
        merges = _sentencepiece_merges(tokens, [float(s) for s in scores])
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tk = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None,
                                 unk_token=tokens[int(unk)] if unk is not None else None))
    # Spaces become "▁" and one is prepended to the first section of the text (not after a special token),
    # as LlamaTokenizer (legacy=False) does; the decoder undoes both.
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if space_prefix else "never",
                                                split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] if space_prefix else steps)
    _add_special(tk, tokens, types, lambda t: True)
    return tk


def _add_special(tk: _HFTokenizer, tokens: list[str], types: list[int], spelled_ok: Any) -> None:
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _CONTROL and spelled_ok(t)]
    if control:
        tk.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tk.add_tokens(user)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(path, f"unreadable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
