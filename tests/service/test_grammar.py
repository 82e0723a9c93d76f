"""Grammar-constrained decoding (service/grammar on llguidance): schemas are checked and refused with a message
naming the problem, and a real engine on the tiny random model (which never writes JSON on its own) produces
output that validates against the schema, also when cut short by num_predict ("json") and when batched with
free sequences."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import jsonschema
import pytest
import torch

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.runtime.engine import InferenceEngine
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.requests import GenerationRequest
from ollama_distributed.service.grammar import (
    GrammarConstraint, SchemaError, compile_format, compile_tool_calls, normalize_format,
)

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind", "tags"],
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
                         "age": {"type": "integer", "minimum": 1, "maximum": 99},
                         "kind": {"enum": ["cat", "dog"]}, "v": {"const": 3},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
                         "home": {"type": "object", "properties": {"x": {"anyOf": [{"type": "integer"},
                                                                                  {"type": "null"}]}},
                                  "required": ["x"], "additionalProperties": False}}}


@pytest.mark.parametrize("bad, message", [
    ({"type": "nonsense-type"}, "nonsense-type"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "nonsense"}}}, "nonsense"),
    ({"type": "string", "pattern": "("}, "regex"),
    ({"$ref": "#/definitions/missing"}, "missing"),
    ({"type": "object", "required": "a"}, "required"),
    ("yaml", "invalid format"),
    (3, "invalid format"),
])
def test_bad_formats_are_refused_with_the_problem_named(bad, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        normalize_format(bad)


def test_normalize_format() -> None:
    assert normalize_format(None) is None and normalize_format("") is None
    assert normalize_format("json") == "json" and normalize_format(PERSON) == PERSON


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path):
    tok = Tokenizer.from_gguf(tiny_gguf)
    eng = InferenceEngine(LocalExecutor(tiny_gguf), tok, max_batch=8, max_queue=32)
    yield eng, tok
    eng.close()


def _run(engine, prompt: str, options: GenerationOptions, fmt=None, grammar: str | None = None, top=None):
    eng, tok = engine
    grammar = grammar or (compile_format(fmt) if fmt is not None else None)
    budget = options.num_predict if options.num_predict >= 0 else None
    constraint = GrammarConstraint(grammar, tok, budget) if grammar else None
    return eng.submit(GenerationRequest(prompt_ids=tok.encode(prompt), options=options, constraint=constraint,
                                        top_logprobs=top))


@pytest.mark.parametrize("seed", range(6))
def test_engine_output_follows_json_and_schema(engine, seed: int) -> None:
    opts = GenerationOptions(seed=seed, temperature=1.2, num_predict=[8, 20, 60][seed % 3], top_k=100)
    free = _run(engine, "Write JSON:", opts).result()
    with pytest.raises(ValueError):
        json.loads(free.text)  # the random model alone does not write JSON
    out = _run(engine, "Write JSON:", opts, fmt="json").result()
    assert isinstance(json.loads(out.text), dict), out.text  # closed in time even at num_predict 8
    wide = GenerationOptions(seed=seed, temperature=1.0, num_predict=200, top_k=100)
    out = _run(engine, "Write JSON:", wide, fmt=PERSON).result()
    assert out.done_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), PERSON)


def test_constrained_and_free_sequences_batch_together(engine) -> None:
    opts = GenerationOptions(seed=1, temperature=0.9, num_predict=30)
    handles = [_run(engine, f"prompt {i}", opts, fmt="json" if i % 2 == 0 else None) for i in range(6)]
    for i, h in enumerate(handles):
        r = h.result()
        if i % 2 == 0:
            json.loads(r.text)
    greedy = GenerationOptions(temperature=0, num_predict=10)
    alone = _run(engine, "prompt 1", greedy).result().text
    mixed = [_run(engine, "prompt 1", greedy), _run(engine, "x", opts, fmt=PERSON)]
    assert mixed[0].result().text == alone  # unconstrained rows are untouched by masking others
    mixed[1].result()


def test_tool_call_grammar(engine) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "add", "parameters": {
                 "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                 "required": ["a", "b"], "additionalProperties": False}}}]
    from ollama_distributed.service.generation import parse_tool_calls

    for seed in range(3):
        opts = GenerationOptions(seed=seed, temperature=1.0, num_predict=120, top_k=50)
        out = _run(engine, "Call a tool:", opts, grammar=compile_tool_calls(tools)).result()
        calls = parse_tool_calls(out.text)
        assert calls and calls[0]["function"]["name"] in ("get_weather", "add"), out.text
        fn = next(t["function"] for t in tools if t["function"]["name"] == calls[0]["function"]["name"])
        jsonschema.validate(calls[0]["function"]["arguments"], fn["parameters"])
    with pytest.raises(SchemaError, match="nope"):
        compile_tool_calls(tools, only="nope")


def test_logprobs_agree_with_greedy_choice(engine, tiny_gguf: Path) -> None:
    eng, tok = engine
    out = _run(engine, "Once upon", GenerationOptions(temperature=0, num_predict=6), top=3).result()
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id and lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    # the values are the raw log-softmax of the logits an executor computes for that position
    ex = LocalExecutor(tiny_gguf)
    try:
        logits = ex.step([1], [tok.encode("Once upon")])[0].float()
        assert out.logprobs[0].logprob == pytest.approx(float(torch.log_softmax(logits, 0)[out.token_ids[0]]),
                                                        abs=1e-4)
    finally:
        ex.close()


def test_constraint_pickles_mid_generation(tiny_gguf: Path) -> None:
    """A constraint shipped to another process (a remote last stage) continues with the same masks."""
    tok = Tokenizer.from_gguf(tiny_gguf)
    c = GrammarConstraint(compile_format(PERSON), tok, 100)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        m = c.allowed_mask(tok.vocab_size)
        c.advance(int(torch.randn(tok.vocab_size, generator=g).masked_fill(~m, float("-inf")).argmax()))
    copy = pickle.loads(pickle.dumps(c))
    assert copy.consumed == c.consumed
    assert torch.equal(copy.allowed_mask(tok.vocab_size), c.allowed_mask(tok.vocab_size))


def test_lazy_tool_call_constraint(tiny_gguf: Path) -> None:
    """Prose stays free; an answer that opens an object becomes a valid call of one of the tools."""
    from ollama_distributed.model.sampling import Sampler
    from ollama_distributed.service.generation import parse_tool_calls
    from ollama_distributed.service.grammar import ToolCallConstraint

    tok = Tokenizer.from_gguf(tiny_gguf)
    add = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"], "additionalProperties": False}}}
    grammar = compile_tool_calls([add])
    # a call starts with the grammar's canonical first token ('{"' in this vocabulary: llguidance keeps forced text
    # in its canonical tokenization, so a lone '{' is refused and the model writes '{"' or prose)
    brace = int(GrammarConstraint(grammar, tok, 10).allowed_mask(tok.vocab_size).nonzero()[0])
    lone_brace, space = tok.token_to_id("{"), tok.encode(" ", add_bos=False)[0]
    hello = tok.encode("Hello", add_bos=False)[0]
    spaced_brace = tok.token_to_id("Ġ{")
    g = torch.Generator().manual_seed(0)

    def run(first: int, seed: int) -> tuple[ToolCallConstraint, list[int]]:
        c = ToolCallConstraint(grammar, tok, 200)
        s = Sampler(GenerationOptions(temperature=1.0, top_k=0, seed=seed), constraint=c)
        out: list[int] = []
        for step in range(200):
            logits = torch.randn(tok.vocab_size, generator=g)
            if step < 2:
                logits[first] += 100.0  # the model "wants" this token first
            t = s.sample(logits, out)
            if t in tok.eos_ids:
                break
            out.append(t)
        return c, out

    for seed in range(3):
        c, out = run(brace, seed)
        assert c.mode == "grammar"
        calls = parse_tool_calls(tok.decode(out))
        assert calls and calls[0]["function"]["name"] == "add", tok.decode(out)
        jsonschema.validate(calls[0]["function"]["arguments"], add["function"]["parameters"])
    c, out = run(hello, 0)
    assert c.mode == "free" and out[0] == hello and bool(c.allowed_mask(tok.vocab_size).all())
    pending = ToolCallConstraint(grammar, tok, 50)
    m = pending.allowed_mask(tok.vocab_size)
    assert m[brace] and m[hello] and m[space]
    assert not m[lone_brace]
    if spaced_brace is not None:
        assert not m[spaced_brace]  # an object opened with a space is not a tool call the grammar accepts
    pending.advance(space)
    assert pending.mode == "pending"
    assert pickle.loads(pickle.dumps(pending)).mode == "pending"
