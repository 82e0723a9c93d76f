"""The runtime's fixed per-step / per-stage overhead in the cost model, the planner and calibration (pure).

Literal tables for the cost model and the fit; brute force for the pipeline search with overhead; a simulated
cluster whose "measured" times carry a fixed overhead (as a tiny model on Ray does: milliseconds of Python and
Ray calls against microseconds of compute): with the overhead term, calibration learns it and leaves the node
factors alone, and predicts a plan it never measured; without it, the factors absorb the overhead.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from ollama_distributed.scheduler import ClusterSpec, PlanConfig, Workload, plan
from ollama_distributed.scheduler.calibration import CalibrationConfig, Calibrator, StepTimings
from ollama_distributed.scheduler.cluster import StepOverhead
from ollama_distributed.scheduler.cost import CostModel
from ollama_distributed.scheduler.errors import ClusterSpecError
from ollama_distributed.scheduler.overhead import OverheadPoint, fit_overhead
from ollama_distributed.scheduler.planner import cost_model

from .helpers import cluster, compositions, fits, node, tiny_profile

PROF = tiny_profile(layers=8)
WL = Workload(prompt_tokens=16, output_tokens=8)


def with_overhead(c: ClusterSpec, step: float, stage: float, seq: float = 0.0) -> ClusterSpec:
    return ClusterSpec(c.nodes, c.default_link, c.link_overrides, StepOverhead(step, stage, seq))


# ---- cost model ---------------------------------------------------------------------------------------------


def test_overhead_adds_step_and_stage_terms() -> None:
    base = cluster(node("a", 1e9), node("b", 1e9))
    p2 = plan(PROF, base, WL, PlanConfig(strategy="pipeline"))
    over = with_overhead(base, 2e-3, 5e-4)
    for objective in ("latency", "throughput"):
        b = CostModel(PROF, base, WL, objective).evaluate(p2.stages)[0]
        o = CostModel(PROF, over, WL, objective).evaluate(p2.stages)[0]
        k = len(p2.stages)
        if objective == "latency":
            assert o.decode_ms_per_token == pytest.approx(b.decode_ms_per_token + 2.0 + k * 0.5)
        assert o.prefill_ms == pytest.approx(b.prefill_ms + 2.0 + k * 0.5)
    # per sequence: 4 sequences decoding together pay it 4 times per step
    wl4 = Workload(prompt_tokens=16, output_tokens=8, concurrency=4)
    b4 = CostModel(PROF, base, wl4, "latency").evaluate(p2.stages)[0]
    o4 = CostModel(PROF, with_overhead(base, 0.0, 0.0, 3e-4), wl4, "latency").evaluate(p2.stages)[0]
    assert o4.decode_ms_per_token == pytest.approx(b4.decode_ms_per_token + 4 * 0.3)
    # throughput: a driver slower than every stage paces the predicted rate (not the objective: it is the same
    # for every layout)
    slow_driver = with_overhead(base, 1.0, 0.0)
    pred, cost = CostModel(PROF, slow_driver, WL, "throughput").evaluate(p2.stages)
    assert pred.tokens_per_s == pytest.approx(WL.concurrency / 1.0) and cost < 1.0


@pytest.mark.parametrize(
    "raw, expected",
    [({"step": "1.5ms", "stage": "500us", "seq": "250us"}, StepOverhead(1.5e-3, 5e-4, 2.5e-4)),
     ({"step": 0.002}, StepOverhead(2e-3, 0.0)),
     (None, StepOverhead())],
)
def test_cluster_yaml_overhead(raw, expected) -> None:
    data = {"nodes": [{"name": "a", "memory": "1GB", "memory_bandwidth": "10GB/s", "flops": "1TFLOPS"}]}
    if raw is not None:
        data["overhead"] = raw
    c = ClusterSpec.from_dict(data)
    assert c.overhead == expected
    assert ClusterSpec.from_dict(c.to_dict()).overhead == expected
    assert c.subset(["a"]).overhead == expected
    assert ("overhead" in c.to_dict()) is (expected != StepOverhead())


@pytest.mark.parametrize("raw", [{"step": "-1ms"}, {"steps": "1ms"}, "1ms"])
def test_bad_overhead_is_a_typed_error(raw) -> None:
    data = {"nodes": [{"name": "a", "memory": "1GB", "memory_bandwidth": "10GB/s", "flops": "1TFLOPS"}],
            "overhead": raw}
    with pytest.raises(ClusterSpecError, match="overhead"):
        ClusterSpec.from_dict(data)


def _brute(cm: CostModel) -> float | None:
    """Best objective over every ordered node subset and layer composition, overhead included."""
    o = cm.overhead
    L, A, F = cm.profile.n_layers, cm.profile.n_kv_heads, cm.profile.ffn_size
    best = None
    for k in range(1, min(len(cm.cluster.names), L) + 1):
        for order in itertools.permutations(cm.cluster.names, k):
            hops = [cm.hop(order[i], order[i + 1]) for i in range(k - 1)]
            ret = cm.return_hop(order[-1], order[0]) if k > 1 else 0.0
            for comp in compositions(L, k):
                if not all(fits(cm, n, l, A, F, i == 0, i == k - 1) for i, (n, l) in enumerate(zip(order, comp))):
                    continue
                times = [l * cm.t_layer(n) + o.stage_s for n, l in zip(order, comp)]
                times[-1] += cm.t_head(order[-1])
                if cm.objective == "latency":
                    v = sum(times) + sum(hops) + ret + o.step_s
                else:
                    v = max(t + h for t, h in zip(times, hops + [ret]))
                best = v if best is None or v < best else best
    return best


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_pipeline_search_with_overhead_equals_brute_force(objective) -> None:
    rng = random.Random(3)
    checked = 0
    for _ in range(40):
        cm0 = cost_model(PROF, cluster(node("x", 1)), WL, PlanConfig(objective=objective))
        nodes = [node(f"n{i}", rng.uniform(0.3, 1.2) * PROF.n_layers * cm0.layer_mem + PROF.embedding_bytes
                      + PROF.head_bytes, bw=rng.choice([1e8, 1e9]), flops=1e11) for i in range(rng.randint(2, 3))]
        t_layer = CostModel(PROF, cluster(*nodes), WL, objective).t_layer("n0")
        # per-stage overhead from negligible to several layers' worth: it must change what is optimal
        c = with_overhead(cluster(*nodes), rng.uniform(0, 1e-3), rng.choice([0.0, 0.5, 3.0]) * t_layer)
        cm = CostModel(PROF, c, WL, objective)
        expected = _brute(cm)
        if expected is None:
            continue
        p = plan(PROF, c, WL, PlanConfig(strategy="pipeline", objective=objective))
        assert cm.cost(p) == pytest.approx(expected, rel=1e-9)
        checked += 1
    assert checked >= 15


# ---- the fit --------------------------------------------------------------------------------------------------

TRUE = StepOverhead(1.5e-3, 0.5e-3, 0.25e-3)


def _points(stages: list[int], computes: list[float], a: float = 2.0, noise: float = 0.0, seed: int = 0,
            batches: tuple[int, ...] = (1,)) -> list[OverheadPoint]:
    rng = random.Random(seed)
    return [OverheadPoint(c * b, k, (a * c * b + TRUE.total(k, b)) * (1 + rng.uniform(-noise, noise)), b)
            for k in stages for c in computes for b in batches]


@pytest.mark.parametrize(
    "points, prior, step, stage, seq, fitted",
    [
        # several plans, sizes and batch sizes: everything identified, exactly (no noise)
        (_points([1, 2, 3], [1e-4, 4e-4], batches=(1, 4)), StepOverhead(), 1.5e-3, 0.5e-3, 0.25e-3,
         ("step", "stage", "seq")),
        # several plans at batch 1: per-sequence time is not identified (its prior, 0, is kept: absorbed by step)
        (_points([1, 2, 3], [1e-4, 4e-4]), StepOverhead(), 1.75e-3, 0.5e-3, 0.0, ("step", "stage")),
        # one plan at one size: nothing identified, the prior stays
        (_points([2], [4e-4]) * 5, StepOverhead(1e-3, 2e-4), 1e-3, 2e-4, 0.0, ()),
        # one plan, several sizes: the total (2.75 ms at k=2, b=1) is identified; the split is the prior's
        (_points([2], [1e-4, 2e-4, 4e-4, 8e-4]), StepOverhead(0.0, 2e-4, 1e-4), 2.25e-3, 2e-4, 1e-4, ("step",)),
        # too few points: the prior
        (_points([1, 2], [1e-4]), StepOverhead(), 0.0, 0.0, 0.0, ()),
    ],
)
def test_fit_table(points, prior, step, stage, seq, fitted) -> None:
    fit = fit_overhead(points, prior)
    assert fit.overhead.step_s == pytest.approx(step, abs=1e-12)
    assert fit.overhead.stage_s == pytest.approx(stage, abs=1e-12)
    assert fit.overhead.seq_s == pytest.approx(seq, abs=1e-12)
    assert fit.fitted == fitted
    if fitted:
        assert fit.scale == pytest.approx(2.0) and fit.rms_s == pytest.approx(0.0, abs=1e-12)


def test_fit_with_noise_stays_close() -> None:
    fit = fit_overhead(_points([1, 2, 3], [1e-4, 2e-4, 4e-4, 8e-4], noise=0.05, seed=1, batches=(1, 2, 8)),
                       StepOverhead())
    assert fit.overhead.step_s == pytest.approx(TRUE.step_s, rel=0.3)
    assert fit.overhead.stage_s == pytest.approx(TRUE.stage_s, rel=0.3)
    assert fit.overhead.seq_s == pytest.approx(TRUE.seq_s, rel=0.3)


def test_fit_never_goes_negative() -> None:
    # measured faster than any overhead could explain: the bounds hold (a ≥ 0, overhead ≥ 0)
    pts = [OverheadPoint(c, k, 1e-4 * c / 1e-4) for k in (1, 2, 3) for c in (1e-4, 3e-4)]
    fit = fit_overhead(pts, StepOverhead())
    assert min(fit.overhead.step_s, fit.overhead.stage_s, fit.overhead.seq_s, fit.scale) >= 0


# ---- calibration on a simulated cluster whose runtime has a fixed overhead ------------------------------------


def _sim():
    prof = tiny_profile(layers=8, hidden=64)
    # a, b hold 5 of the 8 layers each (a plan on two of them has 2 stages), c, d, e 3 (three of them: 3)
    cm0 = CostModel(prof, cluster(node("x", 1e12)), Workload(prompt_tokens=8, output_tokens=1))
    def mem(frac: float) -> float:
        return prof.n_layers * cm0.layer_mem * frac + prof.embedding_bytes + prof.head_bytes
    # memory-bound nodes of different speeds: compute varies between plans, not with the batch (so the reports
    # can tell the per-sequence overhead from compute)
    bw = {"a": 12e9, "b": 8e9, "c": 5e9, "d": 4e9, "e": 3e9}
    nodes = [node(n, mem(0.7 if n in "ab" else 0.45), bw[n], 1e12) for n in "abcde"]
    # the runtime's default overhead, measured on another machine: the right order of magnitude, not the truth
    return prof, ClusterSpec(tuple(nodes), cluster(*nodes).default_link, {}, StepOverhead(1e-3, 0.2e-3, 0.1e-3))


def _measure(prof, declared, p, batch, slow_b: float, rng) -> StepTimings:
    """Truth: node b runs slow_b× slower than declared; the runtime adds TRUE overhead; ±3 % noise."""
    true = ClusterSpec(tuple(node(n.name, n.memory_bytes, n.memory_bandwidth / (slow_b if n.name == "b" else 1),
                                  n.flops / (slow_b if n.name == "b" else 1)) for n in declared.nodes),
                       declared.default_link, {}, TRUE)
    t = StepTimings(1.0, batch=batch, context_tokens=32)
    ms = CostModel(prof, true, t.workload(prof), "latency").evaluate(p.stages)[0].decode_ms_per_token
    return StepTimings(ms * (1 + rng.uniform(-0.03, 0.03)), batch=batch, context_tokens=32)


def test_calibration_learns_the_overhead_and_keeps_node_factors() -> None:
    prof, declared = _sim()
    rng = random.Random(5)
    # plans of 2 and 3 stages (autotune's candidates give this variety), at batch sizes 1 and 8
    cfg = PlanConfig(strategy="pipeline")
    p2 = plan(prof, declared.subset(["a", "b"]), WL, cfg)
    p2b = plan(prof, declared.subset(["b", "c"]), WL, cfg)
    p3 = plan(prof, declared.subset(["c", "d", "e"]), WL, cfg)
    held_out = plan(prof, declared.subset(["a", "d"]), WL, cfg)  # never measured
    assert [len(p.stages) for p in (p2, p2b, p3, held_out)] == [2, 2, 3, 2]
    cals = {flag: Calibrator(declared, CalibrationConfig(fit_overhead=flag)) for flag in (True, False)}
    for _ in range(6):
        for p in (p2, p2b, p3):
            for batch in (1, 8):
                t = _measure(prof, declared, p, batch, 1.0, rng)
                for cal in cals.values():
                    cal.report(p, prof, t)
    on, off = cals[True], cals[False]
    o = on.overhead()
    assert o.step_s == pytest.approx(TRUE.step_s, rel=0.25), on.to_dict()["overhead"]
    assert o.stage_s == pytest.approx(TRUE.stage_s, rel=0.35), on.to_dict()["overhead"]
    assert o.seq_s == pytest.approx(TRUE.seq_s, rel=0.35), on.to_dict()["overhead"]
    # the nodes run as declared: with the overhead term their factors stay near 1; without, they absorb it
    assert all(0.5 < f < 2 for f in on.node_factors().values()), on.node_factors()
    assert min(off.node_factors().values()) > 2, off.node_factors()
    truth = _measure(prof, declared, held_out, 1, 1.0, random.Random(0)).decode_ms_per_token
    t1 = StepTimings(1.0, batch=1, context_tokens=32)
    err_on = abs(on.predicted_decode_ms(held_out, prof, t1) - truth) / truth
    err_off = abs(off.predicted_decode_ms(held_out, prof, t1) - truth) / truth
    print(f"\nheld-out plan: calibration error {err_on:.1%} with the overhead term, {err_off:.1%} without")
    assert err_on < 0.1 and err_on < err_off


def test_a_slow_node_is_still_avoided_with_the_overhead_term() -> None:
    """b truly runs 50× slower than declared: the calibrated planner leaves it out. The fit's single scale a
    cannot describe one slow node (it would read part of b's slowness as overhead), so the fit is rejected by its
    residual and the factors learn as without the overhead term (total-only reports give one ratio per plan, so
    b's partners look slow too, but less than b)."""
    prof, declared = _sim()
    rng = random.Random(9)
    cfg = PlanConfig(strategy="pipeline")
    plans = [plan(prof, declared.subset(list(ns)), WL, cfg) for ns in (["a", "b"], ["c", "d", "e"], ["b", "c"])]
    assert any(sh.node == "b" for st in plan(prof, declared, WL, cfg).stages for sh in st.shards)
    cal = Calibrator(declared)
    for _ in range(8):
        for p in plans:
            for batch in (1, 8):
                cal.report(p, prof, _measure(prof, declared, p, batch, 50.0, rng))
    f = cal.node_factors()
    assert f["b"] == max(f.values()), (f, cal.to_dict()["overhead"])
    assert cal.to_dict()["overhead"]["fitted"] == []
    after = plan(prof, cal.cluster(), WL, cfg)
    assert all(sh.node != "b" for st in after.stages for sh in st.shards), after.to_dict()
    assert not math.isnan(cal.overhead().step_s)
