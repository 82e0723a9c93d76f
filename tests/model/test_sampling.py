"""Sampler vs straightforward numpy implementations of llama.cpp's sampler chain, on synthetic logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.sampling import Sampler, sample_batch

VOCAB = 500


def _logits(seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_penalties(x: np.ndarray, o: GenerationOptions, history: list[int]) -> np.ndarray:
    x = x.astype(np.float64).copy()
    window = history[-o.repeat_last_n :] if o.repeat_last_n > 0 else []
    counts: dict[int, int] = {}
    for t in window:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        x[t] = x[t] * o.repeat_penalty if x[t] <= 0 else x[t] / o.repeat_penalty
        x[t] -= c * o.frequency_penalty + o.presence_penalty
    return x


def ref_chain(logits: torch.Tensor, o: GenerationOptions, history: list[int] = ()) -> tuple[list[int], np.ndarray]:
    """llama.cpp order: penalties, top_k, typical_p, top_p, min_p, temperature (one loop per rule)."""
    x = ref_penalties(logits.numpy(), o, list(history))
    if o.temperature <= 0:
        return [int(np.argmax(x))], np.ones(1)
    ids = [int(i) for i in np.argsort(-x, kind="stable")]
    if 0 < o.top_k < len(ids):
        ids = ids[: o.top_k]
    if o.typical_p < 1:
        p = _softmax(x[ids])
        ent = -np.sum(p * np.log(p))
        order = sorted(range(len(ids)), key=lambda j: abs(-np.log(p[j]) - ent))
        kept, cum = [], 0.0
        for j in order:
            kept.append(j)
            cum += p[j]
            if cum > o.typical_p:
                break
        ids = [ids[j] for j in sorted(kept)]
    if o.top_p < 1:
        p = _softmax(x[ids])
        kept, cum = [], 0.0
        for j, t in enumerate(ids):
            kept.append(t)
            cum += p[j]
            if cum >= o.top_p:
                break
        ids = kept
    if o.min_p > 0:
        p = _softmax(x[ids])
        ids = [t for j, t in enumerate(ids) if p[j] >= o.min_p * p.max()]
    return ids, _softmax(x[ids] / o.temperature)


def test_greedy_is_argmax_and_ignores_seed():
    for s in range(5):
        x = _logits(s)
        for seed in (-1, 0, 123):
            smp = Sampler(GenerationOptions(temperature=0.0, seed=seed))
            assert smp.sample(x) == int(torch.argmax(x))
    assert Sampler(GenerationOptions(temperature=-1.0)).sample(x) == int(torch.argmax(x))


def test_top_k_1_equals_greedy():
    for s in range(10):
        x = _logits(s)
        smp = Sampler(GenerationOptions(top_k=1, temperature=1.5, seed=s))
        assert smp.sample(x) == int(torch.argmax(x))


@pytest.mark.parametrize(
    "opts",
    [
        {"top_k": 40, "top_p": 0.9},  # Ollama defaults
        {"top_k": 0, "top_p": 0.5},
        {"top_k": 0, "top_p": 1.0, "min_p": 0.05},
        {"top_k": 0, "top_p": 1.0, "typical_p": 0.5},
        {"top_k": 100, "typical_p": 0.9, "top_p": 0.8, "min_p": 0.02},
        {"top_k": 5, "top_p": 1.0, "temperature": 0.3},
        {"top_k": 0, "top_p": 0.0},  # keeps exactly one token
    ],
)
def test_filters_match_numpy_reference(opts):
    o = GenerationOptions(**opts)
    for s in range(6):
        x = _logits(100 + s, scale=1.0 + s)
        ids, probs = Sampler(o).candidates(x)
        ref_ids, ref_p = ref_chain(x, o)
        assert ids.tolist() == ref_ids
        np.testing.assert_allclose(probs.numpy(), ref_p, rtol=1e-5, atol=1e-7)
        assert abs(float(probs.sum()) - 1) < 1e-5


def test_filters_actually_filter():
    x = _logits(7)
    full = len(Sampler(GenerationOptions(top_k=0, top_p=1.0)).candidates(x)[0])
    assert full == VOCAB
    assert len(Sampler(GenerationOptions(top_k=0, top_p=0.5)).candidates(x)[0]) < full
    assert len(Sampler(GenerationOptions(top_k=0, top_p=1.0, min_p=0.1)).candidates(x)[0]) < full
    assert len(Sampler(GenerationOptions(top_k=0, top_p=1.0, typical_p=0.5)).candidates(x)[0]) < full
    assert len(Sampler(GenerationOptions(top_k=13, top_p=1.0)).candidates(x)[0]) == 13


def test_penalties_change_exactly_the_right_logits():
    x = torch.linspace(-5, 5, 50)
    history = [3, 3, 3, 45, 45, 10] + [20] * 5
    o = GenerationOptions(repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=9)
    out = Sampler(o).apply_penalties(x, history)
    ref = ref_penalties(x.numpy(), o, history)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)
    window = set(history[-9:])
    changed = {i for i in range(50) if not torch.isclose(out[i], x[i])}
    assert changed == window
    assert changed == {3, 45, 10, 20}
    # token 3 appears 3 times in the history but once in the window: count 1
    assert float(out[3]) == pytest.approx(float(x[3]) * 1.3 - 0.25 - 0.5, abs=1e-5)  # negative: multiplied
    assert float(out[45]) == pytest.approx(float(x[45]) / 1.3 - 2 * 0.25 - 0.5, abs=1e-5)  # positive: divided
    assert torch.equal(Sampler(GenerationOptions(repeat_penalty=1.3, repeat_last_n=0)).apply_penalties(x, history), x)


def test_ties_order_by_id_and_rows_of_any_dtype_sample_alike():
    """Candidates with equal logits come lower id first (so the draw is the same wherever it runs); a bfloat16 row
    samples as its float32 copy; penalties leave the caller's row as it was, greedy or not, and a read-only row
    samples as a writable one."""
    x = torch.zeros(VOCAB)
    x[[7, 3, 400, 9]] = 5.0
    ids, _ = Sampler(GenerationOptions(top_k=4, top_p=1.0)).candidates(x)
    assert ids.tolist() == [3, 7, 9, 400]
    assert Sampler(GenerationOptions(top_k=0, top_p=1.0)).candidates(x)[0][:5].tolist() == [3, 7, 9, 400, 0]
    y = _logits(3).to(torch.bfloat16)
    for seed in range(5):
        a = Sampler(GenerationOptions(seed=seed, repeat_penalty=1.2)).sample(y, [1, 2, 3])
        b = Sampler(GenerationOptions(seed=seed, repeat_penalty=1.2)).sample(y.to(torch.float32), [1, 2, 3])
        assert a == b
    z = _logits(4)
    before = z.clone()
    for opts in ({"temperature": 0}, {"seed": 2}):
        o = GenerationOptions.from_dict({**opts, "repeat_penalty": 1.5, "frequency_penalty": 0.3})
        got = Sampler(o).sample(z, list(range(50)))
        assert torch.equal(z, before)
        frozen = z.numpy().copy()
        frozen.flags.writeable = False
        assert Sampler(o)._draw_row(frozen, list(range(50))) == got and np.array_equal(frozen, before.numpy())


def test_top_k_prefilter_picks_what_a_stable_sort_picks():
    """_top_k_ids (a pre-filter by strided group maxima, then an exact order) equals the first k of a stable
    descending sort on rows with and without a tail past the groups, heavy ties at the k-th value, masked (-inf)
    tokens, a constant row, a NaN, and k from 1 to half the groups."""
    from ollama_distributed.model.sampling import _TOP_K_GROUPS, _top_k_ids

    rng = np.random.default_rng(7)
    rows = []
    for vocab in (49152, 50000, 32000, 1000, 383):
        x = (rng.standard_normal(vocab) * 3).astype(np.float32)
        rows += [x, np.round(x, 1), np.round(x)]  # rounding: many values tied with the k-th
        masked = np.full(vocab, -np.inf, dtype=np.float32)
        keep = rng.choice(vocab, size=min(vocab, 60), replace=False)
        masked[keep] = x[keep]
        rows += [masked, np.zeros(vocab, dtype=np.float32)]
    nan = rows[0].copy()
    nan[[5, 9000]] = np.nan
    rows.append(nan)
    for x in rows:
        for k in (1, 2, 40, 100, _TOP_K_GROUPS // 2):
            if k < x.shape[0]:
                want = np.argsort(-x, kind="stable")[:k]
                assert np.array_equal(_top_k_ids(x, k), want), (x.shape, k)


def test_penalties_drive_greedy_choice():
    x = torch.zeros(10)
    x[4], x[5] = 2.0, 1.9
    hist = [4, 4, 4]
    assert Sampler(GenerationOptions(temperature=0)).sample(x, hist) == 4
    assert Sampler(GenerationOptions(temperature=0, repeat_penalty=1.1)).sample(x, hist) == 5
    assert Sampler(GenerationOptions(temperature=0, frequency_penalty=0.1)).sample(x, hist) == 5


def test_seed_reproducible_and_seeds_differ():
    x = _logits(3, scale=0.5)
    o = GenerationOptions(seed=42, top_k=0, top_p=1.0, temperature=1.0)
    a = [Sampler(o).sample(x) for _ in range(1)]
    s1, s2 = Sampler(o), Sampler(o)
    seq1 = [s1.sample(x) for _ in range(50)]
    seq2 = [s2.sample(x) for _ in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    s3 = Sampler(GenerationOptions(seed=43, top_k=0, top_p=1.0, temperature=1.0))
    assert [s3.sample(x) for _ in range(50)] != seq1
    r1, r2 = Sampler(GenerationOptions(seed=-1)), Sampler(GenerationOptions(seed=-1))
    assert r1.seed != r2.seed and r1.seed >= 0


def test_batch_sampling_independent_of_companions():
    rows = torch.stack([_logits(i, scale=0.7) for i in range(4)])
    opts = [
        GenerationOptions(seed=5, top_k=0, top_p=1.0),
        GenerationOptions(temperature=0),
        GenerationOptions(seed=9, repeat_penalty=1.2),
        GenerationOptions(seed=11, min_p=0.01),
    ]
    hist = [[1, 2, 3], [4], [5, 5, 6], []]
    solo = []
    for i, o in enumerate(opts):
        smp = Sampler(o)
        solo.append([smp.sample(rows[i], hist[i]) for _ in range(20)])
    samplers = [Sampler(o) for o in opts]
    together = [[] for _ in opts]
    for _ in range(20):
        toks = sample_batch(rows, samplers, hist)
        for i, t in enumerate(toks):
            together[i].append(t)
    assert together == solo
    assert together[1] == [int(torch.argmax(rows[1]))] * 20
    with pytest.raises(ValueError, match="2 samplers"):
        sample_batch(rows, samplers[:2], hist)


def test_sampling_frequencies_follow_the_distribution():
    """Chi-square goodness of fit: 20k draws against the tempered softmax; must reject the untempered one."""
    x = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    o = GenerationOptions(seed=1234, top_k=0, top_p=1.0, temperature=0.7)
    smp = Sampler(o)
    n = 20000
    counts = np.bincount([smp.sample(x) for _ in range(n)], minlength=6)
    expected = _softmax(x.numpy().astype(np.float64) / 0.7) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # df = 5, p = 0.001
    wrong = _softmax(x.numpy().astype(np.float64)) * n  # temperature ignored
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 100


def test_truncated_tail_is_never_drawn():
    x = _logits(9)
    o = GenerationOptions(seed=3, top_k=0, top_p=0.6)
    allowed = set(Sampler(o).candidates(x)[0].tolist())
    smp = Sampler(o)
    draws = {smp.sample(x) for _ in range(2000)}
    assert draws <= allowed and len(draws) > 1


def test_masked_logits_are_never_drawn():
    x = torch.full((20,), float("-inf"))
    x[[3, 7]] = torch.tensor([0.0, 0.1])
    smp = Sampler(GenerationOptions(seed=0, top_k=0, top_p=1.0))
    assert {smp.sample(x) for _ in range(200)} == {3, 7}


def test_batched_greedy_argmax_matches_torch_on_ties_nan_and_inf():
    """sample_batch's greedy fast path (numpy's argmax over the float32 logits) picks exactly torch.argmax's
    token: the first index on ties, a NaN as the largest value, and works for other dtypes too."""
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor([[1.0, 3.0, 3.0, 2.0], [nan, 1.0, nan, 5.0], [-inf] * 4, [0.0, inf, inf, 1.0]])
    rows = torch.cat([rows, torch.randn(4, 4)])
    greedy = [Sampler(GenerationOptions(temperature=0.0)) for _ in range(len(rows))]
    want = torch.argmax(rows, dim=-1).tolist()
    assert sample_batch(rows, greedy, [[]] * len(rows)) == want
    assert sample_batch(rows.to(torch.bfloat16), greedy, [[]] * len(rows)) == torch.argmax(
        rows.to(torch.bfloat16), dim=-1).tolist()
    # a greedy row among sampled ones is still the argmax, and the others are unchanged
    mixed = [greedy[0], Sampler(GenerationOptions(seed=3)), greedy[4]]
    alone = Sampler(GenerationOptions(seed=3)).sample(rows[4], [])
    assert sample_batch(rows[[0, 4, 4]], mixed, [[]] * 3) == [want[0], alone, want[4]]
