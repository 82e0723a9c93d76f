"""Per-token mask time of the grammar engines on our SmolLM2 tokenizer (why service/grammar uses llguidance).

Walks each schema's grammar for up to 150 tokens, choosing uniformly among the allowed tokens (seeded), and times
the mask computation of every step. Prints mean / p99 / max µs per engine. xgrammar is measured when installed
(it is not a dependency). Indicative only on a loaded machine.

    python bench/grammar_mask_bench.py
"""

from __future__ import annotations

import json
import time

import numpy as np

from ollama_distributed.model.bundled import bundled_model_path
from ollama_distributed.model.tokenizer import Tokenizer

SCHEMAS = [
    {"type": "object"},
    {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1,
                                               "maxItems": 3}},
     "required": ["name", "age", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "price": {"type": "number", "minimum": 0},
                                         "kind": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["id", "price"]}}}, "required": ["items"]},
]


def walk(fill, consume, done, vocab: int, rng: np.random.Generator, steps: int = 150) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        mask = fill()
        times.append(time.perf_counter() - t0)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
        allowed = np.nonzero(bits)[0]
        if len(allowed) == 0:
            break
        consume(int(rng.choice(allowed)))
        if done():
            break
    return times


def main() -> None:
    tok = Tokenizer.from_gguf(bundled_model_path("smollm2:135m"))
    from ollama_distributed.service.grammar.tokenizer import grammar_tokenizer
    import llguidance
    import llguidance.numpy as lnp

    llt = grammar_tokenizer(tok)
    results: dict[str, list[float]] = {"llguidance": []}
    for i, schema in enumerate(SCHEMAS):
        g = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = llguidance.LLMatcher(llt, g)
        buf = lnp.allocate_token_bitmask(1, llt.vocab_size)

        def fill():
            lnp.fill_next_token_bitmask(m, buf)
            return buf[0]

        results["llguidance"] += walk(fill, m.consume_token, m.is_stopped, tok.vocab_size, np.random.default_rng(i))
    try:
        import xgrammar as xgr
    except ImportError:
        xgr = None
    if xgr is not None:
        enc = [tok.token_bytes(i) if i not in tok.special_ids else (tok.id_to_token(i) or "").encode()
               for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(enc, vocab_type=xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=sorted(tok.eos_ids))
        comp = xgr.GrammarCompiler(info, max_threads=1)
        results["xgrammar"] = []
        for i, schema in enumerate(SCHEMAS):
            m = xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(schema), any_whitespace=False))
            bm = xgr.allocate_token_bitmask(1, info.vocab_size)

            def fill():
                m.fill_next_token_bitmask(bm)
                return bm[0].numpy()

            results["xgrammar"] += walk(fill, m.accept_token, m.is_terminated, tok.vocab_size,
                                        np.random.default_rng(i))
    for name, ts in results.items():
        a = np.array(ts) * 1e6
        print(f"{name:10s} steps={len(a):4d} mean={a.mean():7.1f} µs  p99={np.percentile(a, 99):7.1f} µs  "
              f"max={a.max():7.1f} µs")


if __name__ == "__main__":
    main()
