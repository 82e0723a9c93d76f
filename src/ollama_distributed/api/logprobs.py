"""Token log-probabilities in each API's shape (the values come from model/sampling.py `token_logprob`: the
log-softmax of the raw logits, before grammar, penalties and temperature, as Ollama and llama.cpp report them).

- Ollama (api/types.go `Logprob`, docs/api.md, since v0.12.11): `logprobs: [{token, logprob, bytes,
  top_logprobs: [{token, logprob, bytes}]}]` on each streamed line for its tokens, all of them on a final answer.
- OpenAI chat: `choices[].logprobs = {content: [{token, logprob, bytes, top_logprobs: [...]}], refusal: null}`.
- OpenAI completions (legacy): `choices[].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}],
  text_offset}`.
"""

from __future__ import annotations

from typing import Any, Iterable


def token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """A token's text (its bytes decoded leniently, a part of a UTF-8 character shows as U+FFFD) and bytes."""
    special = getattr(tokenizer, "special_ids", ()) or ()
    if token_id in special:
        data = (tokenizer.id_to_token(token_id) or "").encode()
    else:
        data = tokenizer.token_bytes(token_id)
    return data.decode("utf-8", errors="replace"), list(data)


def _entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text, data = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": data}


def ollama_logprobs(tokenizer: Any, lps: Iterable[Any]) -> list[dict[str, Any]]:
    """Ollama's per-token list (also OpenAI chat's `content` list: the same fields)."""
    out = []
    for lp in lps:
        item = _entry(tokenizer, lp.token_id, lp.logprob)
        item["top_logprobs"] = [_entry(tokenizer, t, v) for t, v in lp.top]
        out.append(item)
    return out


def openai_chat_logprobs(tokenizer: Any, lps: Iterable[Any]) -> dict[str, Any]:
    return {"content": ollama_logprobs(tokenizer, lps), "refusal": None}


def openai_completion_logprobs(tokenizer: Any, lps: Iterable[Any], offset: int = 0) -> dict[str, Any]:
    """Legacy completions shape; `offset` is the text offset of the first token (for streamed pieces)."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text, _ = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in lp.top:
            top.setdefault(token_text(tokenizer, t)[0], v)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
