"""Decoding one step ahead of the engine (runtime/lookahead.py): what is taken, what is rewound, and that the
tokens are those of the in-process engine whatever the engine does between steps (a sequence joins, one is fed
something else, one ends)."""

from __future__ import annotations

import time

import pytest

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.sampling import Sampler
from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.lookahead import Lookahead, lookahead_depth, next_feeds
from ollama_distributed.runtime.placement import uniform_plan
from ollama_distributed.runtime.ray_executor import RayExecutor

S1, S2, S3 = object(), object(), object()


# (engine's step: seq ids, feeds, samplers) -> rows taken {row: row sent ahead}, sequences rewound
HITS = [
    (([1, 2], [[10], [20]], [S1, S2]), {0: 0, 1: 1}, []),  # the plain next decode step
    (([2, 1], [[20], [10]], [S2, S1]), {0: 1, 1: 0}, []),  # rows in another order
    (([1, 2, 3], [[10], [20], [5, 6, 7]], [S1, S2, S3]), {0: 0, 1: 1}, []),  # a prompt joins
    (([1, 2], [[10], [21]], [S1, S2]), {0: 0}, [2]),  # 2 fed something else: rewound
    (([1, 2], [[10], [20, 4]], [S1, S2]), {0: 0}, [2]),  # 2 fed more than one token
    (([1, 2], [[10], [20]], [S1, S3]), {0: 0}, [2]),  # 2's sampler replaced
    (([1, 2], [[10], [20]], [S1, None]), {0: 0}, [2]),  # 2 not sampled
    (([1], [[10]], [S1]), {0: 0}, [2]),  # 2 left out without a free
    (([], [], []), {}, [1, 2]),  # logits asked for instead (RayExecutor.step)
]


@pytest.mark.parametrize("call, taken, rewound", HITS)
def test_hits_and_stale_rows(call, taken, rewound):
    ahead = Lookahead([1, 2], [10, 20], [id(S1), id(S2)])
    hits = ahead.hits(*call)
    assert hits == taken
    assert ahead.stale(list(hits.values())) == rewound


def test_freed_rows_are_neither_taken_nor_rewound():
    ahead = Lookahead([1, 2], [10, 20], [id(S1), id(S2)])
    ahead.freed.add(2)
    hits = ahead.hits([1, 2], [[10], [20]], [S1, S2])
    assert hits == {0: 0} and ahead.stale(list(hits.values())) == []


# (samplers, sampled, cached lengths, max_seq_len) -> the feeds sent ahead
NEXT = [
    (([S1, S2], [7, 8], [3, 4], 16), [7, 8]),
    (([S1, None], [7, None], [3, 4], 16), None),  # a prompt chunk mid-way: the next step is not a plain decode
    (([S1, S2], [7, None], [3, 4], 16), None),
    (([S1], [7], [16], 16), None),  # the cache is full
    (([S1], [7], [15], 16), [7]),
    (([], [], [], 16), None),
]


@pytest.mark.parametrize("args, feeds", NEXT)
def test_next_feeds(args, feeds):
    assert next_feeds(*args) == feeds


def _greedy() -> Sampler:
    return Sampler(GenerationOptions.from_dict({"temperature": 0}), 256)


def _seeded() -> Sampler:
    return Sampler(GenerationOptions.from_dict({"temperature": 0.9, "top_k": 30, "repeat_penalty": 1.2,
                                                "repeat_last_n": 4, "seed": 5}), 256)


def _script(step, seeded: bool = True) -> list[list[int | None]]:
    """An engine's life in six calls: A decodes; B joins with its prompt; A is fed a token it did not sample
    (as a context edit would); B ends (freed) while A goes on; A alone."""
    a, b = _seeded() if seeded else _greedy(), _greedy()
    out = []
    t = step([0], [[1, 17, 42, 99]], [a], [[1, 17, 42, 99]])
    out.append(t)
    hist_a = [1, 17, 42, 99, t[0]]
    t = step([0, 1], [[hist_a[-1]], [5, 6, 300]], [a, b], [hist_a, [5, 6, 300]])
    out.append(t)
    hist_a.append(t[0])
    hist_b = [5, 6, 300, t[1]]
    t = step([0, 1], [[hist_a[-1]], [hist_b[-1]]], [a, b], [hist_a, hist_b])
    out.append(t)
    hist_a.append(1000)  # fed something other than what it sampled
    hist_b.append(t[1])
    t = step([0, 1], [[1000], [hist_b[-1]]], [a, b], [hist_a, hist_b])
    out.append(t)
    hist_a.append(t[0])
    step.free(1)
    for _ in range(2):
        t = step([0], [[hist_a[-1]]], [a], [hist_a])
        out.append(t)
        hist_a.append(t[0])
    return out


class _Local:
    def __init__(self, path):
        self.ex = LocalExecutor(path, max_seq_len=256)

    def __call__(self, ids, feeds, samplers, hists):
        logits = self.ex.step(ids, feeds)
        return [s.sample(logits[i], h) for i, (s, h) in enumerate(zip(samplers, hists))]

    def free(self, sid):
        self.ex.free(sid)


class _Remote:
    def __init__(self, ex):
        self.ex = ex

    def __call__(self, ids, feeds, samplers, hists):
        return self.ex.step_sampled(ids, feeds, samplers, hists)

    def free(self, sid):
        self.ex.free(sid)


# Two steps go ahead, the second fed on the shards with what the first samples (the output rank keeps its samples
# and sends them to stage 0's other ranks): (rows taken, rows rewound) are, on every plan shape, A in calls 2, 3,
# 5, 6 and B in 3, 4 taken; rewound A's second step when B joins, then in call 4 A twice (fed 1000) and B once (the
# step after the one A missed). "-gloo": the feed (and every hop and sum) over gloo, as across machines.
COUNTS = (6, 4)
SCRIPTED = {"single": [["node1"]], "pp2": [["node1"], ["node2"]], "tp2": [["node1", "node2"]],
            "hybrid2x2": [["node0", "node1"], ["node2", "node3"]]}


@pytest.mark.parametrize("setting, widths, depth", [
    ("auto", [1], 2), ("auto", [1, 1], 2), ("auto", [2, 2], 2), ("auto", [2, 1, 3], 2),
    ("auto", [2], 1), ("auto", [3], 1),  # tensor parallel alone: the driver relays (lookahead_depth says why)
    ("0", [1, 1], 0), ("1", [1, 1], 1), ("2", [2], 2), (" AUTO ", [1], 2),
])
def test_lookahead_depth(setting, widths, depth):
    assert lookahead_depth(setting, widths) == depth


def test_lookahead_depth_refuses_other_settings():
    with pytest.raises(ValueError, match="auto, 0, 1 or 2"):
        lookahead_depth("3", [1])


@pytest.mark.slow
@pytest.mark.parametrize("name", [*SCRIPTED, "pp2-gloo", "hybrid2x2-gloo"])
def test_steps_sent_ahead_give_the_in_process_tokens(name, tiny_gguf, ray_cluster, monkeypatch):
    monkeypatch.setenv("OLLAMA_DISTRIBUTED_LOOKAHEAD", "2")  # fed on the shards on every shape, tp2's included
    if name.endswith("-gloo"):
        monkeypatch.setenv("OLLAMA_DISTRIBUTED_SHM_COMM", "0")
    shape = SCRIPTED[name.removesuffix("-gloo")]
    local = _Local(tiny_gguf)
    # tensor parallelism sums partial products in another order: logits within 1e-4 of the unsharded engine's
    # (test_ray_executor), greedy tokens equal, but a seeded draw near a boundary of the distribution may not be
    tp = any(len(row) > 1 for row in shape)
    want = _script(local, seeded=not tp)
    local.ex.close()
    ex = RayExecutor(uniform_plan(read_config(tiny_gguf), shape, "tiny"), tiny_gguf, ray_cluster, max_seq_len=256)
    try:
        assert ex.lookahead
        got = _script(_Remote(ex), seeded=not tp)
        assert got == want
        assert (ex.lookahead_taken, ex.lookahead_rewound) == COUNTS
        ex.free(0)
        assert ex.cached_sequences() == set()
    finally:
        ex.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "pp2"])  # (tensor parallel: its draws may differ, see above)
def test_engine_on_ray_with_lookahead_equals_in_process_engine(name, tiny_gguf, ray_cluster):
    """Requests that join, end (num_predict 1 … 30), chunk their prompts and sample with penalties, through the
    engine on one shard and on a 2-stage pipeline: every request's tokens and text equal the in-process engine's,
    and most decode rows came from steps sent ahead."""
    from ollama_distributed.model.tokenizer import Tokenizer
    from ollama_distributed.runtime.engine import GenerationRequest, InferenceEngine

    tok = Tokenizer.from_gguf(tiny_gguf)
    texts = ["Once upon a time", "The quick brown fox", "def f(x):\n    return x", "1, 2, 3,", "Hello"]
    # The reference runs one request at a time, the engine under test batches them as they arrive, and float32
    # logits of a row move by ~3e-6 with the batch around it (matmul kernels differ by row count; measured on this
    # model). Over the whole vocabulary (top_k 0: ~12,000 candidates at temperature 1.2) this request's draws fall
    # within 3-5e-6 (of the total mass) of a boundary between two tokens, so a batch can change a token (CI drew
    # another at the 21st of 25, twice); with top_k 40 (Ollama's default) its closest draw is 3e-4 away.
    opts = [{"temperature": 0, "num_predict": 30},
            {"seed": 12, "temperature": 1.2, "top_k": 40, "num_predict": 25},
            {"temperature": 0, "repeat_penalty": 1.3, "num_predict": 20, "num_batch": 4},
            {"seed": 3, "min_p": 0.05, "num_predict": 12, "num_batch": 3},
            {"temperature": 0, "num_predict": 1}]
    reqs = [GenerationRequest(tok.encode(t), GenerationOptions.from_dict(o)) for t, o in zip(texts, opts)]
    local = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=256), tok, max_batch=8)
    try:
        want = [local.generate(r) for r in reqs]
    finally:
        local.close()
    ex = RayExecutor(uniform_plan(read_config(tiny_gguf), SCRIPTED[name], "tiny"), tiny_gguf, ray_cluster,
                     max_seq_len=256)
    eng = InferenceEngine(ex, tok, max_batch=8)
    try:
        handles = []
        for r in reqs:  # staggered: each joins a batch that is already decoding
            handles.append(eng.submit(r))
            time.sleep(0.05)
        got = [h.result() for h in handles]
        for a, b in zip(got, want):
            assert (a.token_ids, a.text, a.done_reason) == (b.token_ids, b.text, b.done_reason)
        assert ex.lookahead_taken > sum(len(w.token_ids) for w in want) // 2
        assert ex.cached_sequences() == set()
    finally:
        eng.close()
        ex.close()
