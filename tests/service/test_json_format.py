"""JSON-constrained decoding: the automaton accepts exactly JSON-object prefixes, and a real engine on the tiny
random model (which never writes JSON on its own) always produces a valid JSON object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.runtime.engine import InferenceEngine
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.requests import GenerationRequest
from ollama_distributed.service.json_format import ConstrainedExecutor, JsonState, validate_format

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=5), json_values, max_size=4), indent=st.sampled_from([None, 1]))
def test_every_prefix_accepted_and_completable(obj: dict, indent) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    state = JsonState()
    for i, ch in enumerate(text):
        nxt = state.feed(ch)
        assert nxt is not None, (text, i)
        state = nxt
        completed = text[: i + 1] + state.completion()
        json.loads(completed)
        assert JsonState().feed(completed).done
    assert state.done


@pytest.mark.parametrize("bad", ["[1]", '"s"', "1", '{"a":01}', "{a:1}", '{"a":1,}', '{"a":tru', '{"a":1}}',
                                 '{"a":"\x01"}', '{"a":-}', '{"a":1.}x', " {}", '{"a":\'x\'}'])
def test_rejects(bad: str) -> None:
    s = JsonState().feed(bad)
    assert s is None or not s.done


def test_validate_format() -> None:
    assert validate_format(None) is None and validate_format("") is None
    assert validate_format("json") == "json" and validate_format({"type": "object"}) == {"type": "object"}
    for bad in ("yaml", 3, ["json"]):
        with pytest.raises(ValueError, match="invalid format"):
            validate_format(bad)


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path):
    tok = Tokenizer.from_gguf(tiny_gguf)
    ex = ConstrainedExecutor(LocalExecutor(tiny_gguf), tok)
    eng = InferenceEngine(ex, tok, max_batch=8, max_queue=32)
    yield eng, ex, tok
    eng.close()


def _run(engine, prompt: str, options: GenerationOptions, constrained: bool):
    eng, ex, tok = engine
    ids = tok.encode(prompt)
    req = GenerationRequest(prompt_ids=ids, options=options)
    with ex.lock:
        handle = eng.submit(req)
        if constrained:
            budget = options.num_predict if options.num_predict >= 0 else 10**9
            ex.register(handle.seq_id, len(ids), budget)
    return handle


@pytest.mark.parametrize("seed", range(6))
def test_engine_output_is_json(engine, seed: int) -> None:
    opts = GenerationOptions(seed=seed, temperature=1.2, num_predict=[8, 20, 60][seed % 3], top_k=100)
    free = _run(engine, "Write JSON:", opts, constrained=False).result()
    with pytest.raises(ValueError):
        json.loads(free.text)  # the random model alone does not write JSON
    out = _run(engine, "Write JSON:", opts, constrained=True).result()
    assert isinstance(json.loads(out.text), dict), out.text
    assert engine[1].live_sequences == 0


def test_constrained_and_free_sequences_batch_together(engine) -> None:
    opts = GenerationOptions(seed=1, temperature=0.9, num_predict=30)
    handles = [_run(engine, f"prompt {i}", opts, constrained=i % 2 == 0) for i in range(6)]
    results = [h.result() for h in handles]
    for i, r in enumerate(results):
        if i % 2 == 0:
            json.loads(r.text)
    greedy = GenerationOptions(temperature=0, num_predict=10)
    alone = _run(engine, "prompt 1", greedy, constrained=False).result().text
    mixed = [_run(engine, "prompt 1", greedy, constrained=False), _run(engine, "x", opts, constrained=True)]
    assert mixed[0].result().text == alone  # unconstrained rows are untouched by masking others
    mixed[1].result()


@pytest.mark.slow
def test_rebind_replays_a_constrained_sequence_exactly(smollm2_path: Path) -> None:
    """After a failure the wrapper gets a fresh executor and the engine replays prompt + generated tokens from
    position 0: the constraint must restart with its original budget, so seeded output equals a run without
    the switch (the budget matters: near its end the mask forces the shortest JSON completion)."""
    import torch

    tok = Tokenizer.from_gguf(smollm2_path)
    # SmolLM2 writes a real object here (the tiny random model only ever closes "{}" at once)
    prompt = tok.encode("<|im_start|>user\nDescribe a cat as JSON with name and age.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    budget = 24

    def sample(ex: ConstrainedExecutor, seq: int, history: list[int], feed: list[int], n: int) -> list[int]:
        """n tokens sampled at temperature 1.5 with a generator seeded by the position: reproducible."""
        out: list[int] = []
        for _ in range(n):
            probs = torch.softmax(ex.step([seq], [feed])[0] / 1.5, dim=-1)
            g = torch.Generator().manual_seed(1000 + len(history) + len(out))
            nxt = int(torch.multinomial(probs, 1, generator=g))
            out.append(nxt)
            feed = [nxt]
        history.extend(out)
        return out

    ref_ex = ConstrainedExecutor(LocalExecutor(smollm2_path), tok)
    ref_ex.register(1, len(prompt), budget)
    reference = sample(ref_ex, 1, [], prompt, budget)
    end = next((i for i, t in enumerate(reference) if t in tok.eos_ids), len(reference))
    assert isinstance(json.loads(tok.decode(reference[:end])), dict)
    assert end > 10, "the switch below must happen while the JSON object is still open"

    ex = ConstrainedExecutor(LocalExecutor(smollm2_path), tok)
    ex.register(7, len(prompt), budget)
    generated: list[int] = []
    sample(ex, 7, generated, prompt, 10)
    old = ex.inner
    ex.rebind(LocalExecutor(smollm2_path))
    old.close()
    assert ex.live_sequences == 0
    # replay: the prompt and the first 9 generated tokens are fed again; the 10th is fed as the next step's input
    replayed = prompt + generated[:-1]
    ex.step([7], [replayed])
    sample(ex, 7, generated, [generated[-1]], budget - 10)
    assert generated == reference
