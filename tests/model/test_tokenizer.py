"""Tokenizer from GGUF metadata: ids and text identical to transformers' GGUF tokenizer on the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ollama_distributed.model.errors import ModelFileError
from ollama_distributed.model.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError
from tests.helpers.tiny_gguf import sentencepiece_tokenizer_metadata

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "Why is the sky blue?",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文测试，日本語のテキスト，한국어",
    "café naïve façade Ωmega ß Ünïcödé",
    "def f(x):\n\treturn x**2  # comment\n\n\nclass A: pass",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "tabs\t\t\tand   spaces    \r\n end   ",
    "  2  leading spaces 2024 and 12345 3.14159",
    "",
    " ",
    "\n\n",
    "don't I'll we've THEY'RE",
    "<|endoftext|><repo_name>x<file_sep>",
    "a" * 300,
    "Ā ā Ă \u00a0non-breaking\u200bzero-width",
    # These split differently under the GPT-2 regex and the llama3/qwen2-style regexes.
    "hello!!!\n\n  \n  x\n\n\n  y ok?!\n",
    "Hello\r\n\r\nWorld .\n\n. a/b/c\n",
]


def _hf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def pair(tiny_gguf: Path):
    """(ours, transformers') for the tiny GGUF, which carries SmolLM2's tokenizer verbatim."""
    return Tokenizer.from_gguf(tiny_gguf), _hf_tokenizer(tiny_gguf)


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    dec = tok.incremental_decoder(skip_special=skip_special)
    return [dec.feed(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_ids_and_text_equal_transformers(pair, text: str) -> None:
    ours, hf = pair
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
    assert "".join(_stream(ours, ids)) == ours.decode(ids)
    assert "".join(_stream(ours, ids, skip_special=True)) == ours.decode(ids, skip_special=True)


def test_special_ids(pair) -> None:
    ours, hf = pair
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_id == hf.bos_token_id == 1 and ours.eos_id == hf.eos_token_id == 2
    assert ours.add_bos is False  # SmolLM2: tokenizer.ggml.add_bos_token = false
    # eos (<|im_end|>) plus the other end-of-generation spelling the vocabulary has (<|endoftext|>).
    assert ours.eos_ids == {ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")} == {0, 2}
    assert ours.encode("hi", add_bos=True)[0] == 1 and ours.encode("hi", add_bos=False)[0] != 1
    assert ours.bos_token == "<|im_start|>" and ours.eos_token == "<|im_end|>"


def test_incremental_decoder_never_splits_a_character(pair) -> None:
    ours, _ = pair
    text = "😀👍🏽中文é"
    ids = ours.encode(text)
    assert len(ids) > len(text)  # byte-level: these characters span several tokens each
    pieces = _stream(ours, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Some pieces are empty: a token that ends mid-character emits nothing until the character completes.
    assert "" in pieces[:-1]
    # Feeding several ids at once gives the same text.
    dec = IncrementalDecoder(ours)
    assert dec.feed(ids[:3]) + dec.feed(ids[3:]) + dec.flush() == text


def test_incremental_decoder_skips_special_tokens(pair) -> None:
    ours, _ = pair
    ids = ours.encode("<|im_start|>assistant\nHello!<|im_end|>")
    assert "".join(_stream(ours, ids, skip_special=True)) == "assistant\nHello!"
    assert "".join(_stream(ours, ids)) == "<|im_start|>assistant\nHello!<|im_end|>"


def test_incremental_decoder_flushes_incomplete_character(pair) -> None:
    ours, _ = pair
    ids = ours.encode("😀")
    dec = ours.incremental_decoder()
    assert dec.feed(ids[:-1]) == ""
    assert dec.flush() == "\ufffd"  # a truncated stream ends in a replacement character, never an exception


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_random_text_equals_transformers(pair, text: str) -> None:
    ours, hf = pair
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids) == "".join(_stream(ours, ids))


# Other byte-level pre-tokenizers (llama3, qwen2, gpt-4o, tekken), BOS handling, on a 4096-token prefix of
# SmolLM2's vocabulary (fast to build in both libraries).
@pytest.mark.parametrize(
    "overrides",
    [
        {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": True},
        {"tokenizer.ggml.pre": "qwen2"},
        {"tokenizer.ggml.pre": "gpt-4o"},
        {"tokenizer.ggml.pre": "tekken", "tokenizer.ggml.add_bos_token": True},
        {"tokenizer.ggml.pre": "default"},
    ],
    ids=lambda o: o["tokenizer.ggml.pre"],
)
def test_pre_tokenizer_variants_equal_transformers(tiny_gguf_factory, overrides) -> None:
    path = tiny_gguf_factory(vocab=4096, n_layers=1, tokenizer_overrides=overrides)
    ours, hf = Tokenizer.from_gguf(path), _hf_tokenizer(path)
    assert ours.add_bos == bool(overrides.get("tokenizer.ggml.add_bos_token", False))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids) == "".join(_stream(ours, ids))


@pytest.fixture(scope="module")
def sp_pair(tmp_path_factory):
    """A SentencePiece ("llama" tokenizer model, Llama-2/Mistral style) GGUF: ours, transformers', sentencepiece."""
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    meta, sp = sentencepiece_tokenizer_metadata()
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("sp") / "tiny.gguf", n_layers=1, tokenizer_metadata=meta)
    return Tokenizer.from_gguf(path), _hf_tokenizer(path), sp


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_sentencepiece_ids_equal_transformers(sp_pair, text: str) -> None:
    ours, hf, _ = sp_pair
    ids = ours.encode(text)
    assert ids[0] == ours.bos_id == 1  # SentencePiece vocabularies add BOS
    assert ids == hf(text)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
    assert "".join(_stream(ours, ids)) == ours.decode(ids)
    assert "".join(_stream(ours, ids, skip_special=True)) == ours.decode(ids, skip_special=True)


def test_sentencepiece_matches_sentencepiece_itself(sp_pair) -> None:
    """Against the reference SentencePiece library, for text that neither starts with whitespace nor spells
    control tokens (there transformers' Metaspace conversion, which we follow, knowingly differs)."""
    ours, _, sp = sp_pair
    texts = [t for t in TEXTS if t and not t[0].isspace() and "<" not in t]
    assert len(texts) > 8
    for text in texts:
        assert ours.encode(text, add_bos=False) == sp.encode(text), text
        assert ours.decode(ours.encode(text), skip_special=True) == sp.decode(sp.encode(text)) == text
    assert ours.eos_ids == {2} and ours.token_to_id("<0x41>") is not None


def test_from_hf_dir_equals_transformers(pair, sp_pair, tmp_path: Path) -> None:
    for name, (_, hf, *_) in {"bpe": pair, "sp": sp_pair}.items():
        hf.save_pretrained(tmp_path / name)
        ours = Tokenizer.from_hf_dir(tmp_path / name)
        reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / name))
        assert ours.chat_template and ours.chat_template == reloaded.chat_template
        assert ours.bos_id == reloaded.bos_token_id and ours.eos_id == reloaded.eos_token_id
        for text in TEXTS:
            ids = ours.encode(text)
            assert ids == reloaded(text)["input_ids"], (name, text)
            assert ours.decode(ids) == reloaded.decode(ids) == "".join(_stream(ours, ids))


@pytest.mark.slow
def test_real_smollm2_gguf(smollm2_path: Path) -> None:
    ours, hf = Tokenizer.from_gguf(smollm2_path), _hf_tokenizer(smollm2_path)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]
    assert ours.chat_template and "<|im_start|>" in ours.chat_template


def test_bad_metadata_raises_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_metadata({"general.architecture": "llama"})
    with pytest.raises(TokenizerError, match="'bert'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]})
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
                                 "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 7})
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"hello, not a model file")
    with pytest.raises(ModelFileError, match="not.gguf"):
        Tokenizer.from_gguf(bad)
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
