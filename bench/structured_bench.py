"""Schema-constrained vs free decoding through the API (issue 16), at 1 and 16 concurrent requests.

Starts `ollama-distributed serve` on a free 127.0.0.1 port (SmolLM2-135M, bundled), then for each concurrency
sends that many /api/generate requests at once ("stream": false, greedy, num_predict --tokens), free and with a
JSON schema in `format`, interleaved round by round. Prints each mode's decode rate per request
(eval_count / eval_duration, so answers of different lengths compare) and the aggregate tokens/s of the round.
Then, in process, the grammar's own share: the time spent in `allowed_mask` + `advance` of 16 constrained
sequences against the engine's wall time for them (the issue's bound: <= 10 % at 16 concurrent).

Indicative only on a shared machine: compare the modes within one run.

    python bench/structured_bench.py [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

MODEL = "smollm2:135m"
SCHEMA = {"type": "object", "required": ["store", "items"], "additionalProperties": False, "properties": {
    "store": {"type": "string", "maxLength": 24},
    "items": {"type": "array", "maxItems": 12, "items": {
        "type": "object", "required": ["name", "price", "unit"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "maxLength": 24},
                       "price": {"type": "integer", "minimum": 0, "maximum": 10000},
                       "unit": {"enum": ["kg", "piece", "litre"]}}}}}}


def _prompt(i: int) -> str:
    return (f"<|im_start|>user\nList the groceries of shop number {i} with prices, as JSON.<|im_end|>\n"
            "<|im_start|>assistant\n")


def _one(url: str, i: int, tokens: int, constrained: bool) -> dict:
    body = {"model": MODEL, "prompt": _prompt(i), "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": tokens}}
    if constrained:
        body["format"] = SCHEMA
    r = httpx.post(url + "/api/generate", json=body, timeout=900)
    r.raise_for_status()
    return r.json()


def api_rounds(url: str, tokens: int, rounds: int) -> None:
    _one(url, 0, 4, True)  # load the model and compile the schema once
    for conc in (1, 16):
        rates: dict[bool, list[float]] = {False: [], True: []}
        agg: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for constrained in (False, True):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(conc) as pool:
                    outs = list(pool.map(lambda i: _one(url, i, tokens, constrained), range(conc)))
                wall = time.perf_counter() - t0
                for o in outs:
                    if o["eval_count"] > 1:
                        rates[constrained].append(o["eval_count"] / (o["eval_duration"] / 1e9))
                agg[constrained].append(sum(o["eval_count"] for o in outs) / wall)
                if constrained:
                    for o in outs:
                        json.loads(o["response"]) if o["done_reason"] == "stop" else None
        for constrained in (False, True):
            mode = "schema" if constrained else "free  "
            print(f"concurrency {conc:2d} {mode}: per-request decode {statistics.median(rates[constrained]):6.1f} "
                  f"tok/s (median), aggregate {max(agg[constrained]):6.1f} tok/s (best round)")
        ratio = statistics.median(rates[True]) / statistics.median(rates[False])
        print(f"concurrency {conc:2d}: constrained / free per-request decode rate = {ratio:.2f}")


def mask_share(tokens: int) -> None:
    """In process: grammar time (mask + advance) over engine wall time, 16 constrained sequences."""
    from ollama_distributed.model.bundled import bundled_model_path
    from ollama_distributed.model.options import GenerationOptions
    from ollama_distributed.model.tokenizer import Tokenizer
    from ollama_distributed.runtime.engine import GenerationRequest, InferenceEngine
    from ollama_distributed.runtime.local_executor import LocalExecutor
    from ollama_distributed.service.grammar import GrammarConstraint, compile_format

    path = bundled_model_path(MODEL)
    tok = Tokenizer.from_gguf(path)
    grammar = compile_format(SCHEMA)
    spent = [0.0]

    class Timed(GrammarConstraint):
        def allowed_mask(self, vocab_size):
            t0 = time.perf_counter()
            try:
                return super().allowed_mask(vocab_size)
            finally:
                spent[0] += time.perf_counter() - t0

        def advance(self, token):
            t0 = time.perf_counter()
            try:
                super().advance(token)
            finally:
                spent[0] += time.perf_counter() - t0

    with InferenceEngine(LocalExecutor(path), tok, max_batch=16) as eng:
        opts = GenerationOptions(temperature=0, num_predict=tokens)
        eng.generate(GenerationRequest(tok.encode(_prompt(0)), opts))  # warm-up
        t0 = time.perf_counter()
        handles = [eng.submit(GenerationRequest(tok.encode(_prompt(i)), opts,
                                                constraint=Timed(grammar, tok, tokens))) for i in range(16)]
        n = sum(len(h.result().token_ids) for h in handles)
        wall = time.perf_counter() - t0
    print(f"in process, 16 constrained: {n} tokens in {wall:.1f} s; grammar mask+advance {spent[0] * 1e3:.0f} ms "
          f"= {100 * spent[0] / wall:.1f} % of the wall time ({spent[0] / max(n, 1) * 1e6:.0f} µs per token)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from serve_proc import serving

    with serving(env={"OLLAMA_NUM_PARALLEL": "16", "OLLAMA_MAX_QUEUE": "64"}) as srv:
        api_rounds(srv.url, args.tokens, args.rounds)
    mask_share(args.tokens)


if __name__ == "__main__":
    main()
