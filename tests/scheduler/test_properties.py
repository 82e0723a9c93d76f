"""Property tests: any feasible plan covers the model exactly once, fits in memory and round-trips."""

from hypothesis import HealthCheck, given, settings, strategies as st

from ollama_distributed.scheduler import InfeasiblePlanError, PartitionPlan, PlanConfig, Workload
from ollama_distributed.scheduler.planner import cost_model, plan

from .helpers import cluster, node, tiny_profile


@st.composite
def instances(draw):
    layers = draw(st.integers(1, 16))
    kv = draw(st.integers(1, 6))
    group = draw(st.integers(1, 3))
    ffn = draw(st.integers(1, 40))
    prof = tiny_profile(layers, kv, group, ffn, hidden=draw(st.sampled_from([32, 64])),
                        vocab=draw(st.integers(16, 512)), tied=draw(st.booleans()))
    n = draw(st.integers(1, 6))
    per_layer = prof.layer_bytes + prof.kv_bytes_per_token_per_layer * 64
    total = prof.total_weight_bytes + prof.n_layers * prof.kv_bytes_per_token_per_layer * 64
    nodes = [node(f"n{i}", draw(st.floats(0.05, 1.5)) * total + draw(st.integers(0, 3)) * per_layer,
                  bw=draw(st.floats(1e9, 1e12)), flops=draw(st.floats(1e11, 1e14))) for i in range(n)]
    c = cluster(*nodes, latency=draw(st.floats(0, 1e-3)), bandwidth=draw(st.floats(1e7, 1e10)))
    w = Workload(prompt_tokens=draw(st.integers(1, 40)), output_tokens=draw(st.integers(1, 23)),
                 concurrency=draw(st.integers(1, 4)))
    strategy = draw(st.sampled_from(["auto", "single", "pipeline", "tensor", "hybrid"]))
    return prof, c, w, PlanConfig(strategy=strategy, exact_node_limit=draw(st.integers(1, 6)))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_plans_cover_everything_once_and_fit(inst):
    prof, c, w, cfg = inst
    try:
        p = plan(prof, c, w, cfg)
    except InfeasiblePlanError as exc:
        assert "needs" in str(exc) and "hold" in str(exc)
        return
    # every layer in exactly one stage; every KV head / head / FFN column exactly once per stage
    p.validate(prof)
    covered = [l for st_ in p.stages for l in range(*st_.layers)]
    assert covered == list(range(prof.n_layers))
    for st_ in p.stages:
        heads = [h for sh in st_.shards for h in range(*sh.heads)]
        assert sorted(heads) == list(range(prof.n_heads))
        cols = [f for sh in st_.shards for f in range(*sh.ffn)]
        assert sorted(cols) == list(range(prof.ffn_size))
    # no node used twice, none over its memory
    assert len(set(p.nodes)) == len(p.nodes)
    for sh in (s for st_ in p.stages for s in st_.shards):
        assert sh.memory_bytes <= c.node(sh.node).memory_bytes
    # the prediction is the cost model's, and JSON round-trips
    cm = cost_model(prof, c, w, cfg)
    pred, _ = cm.evaluate(p.stages)
    assert pred == p.predicted
    assert PartitionPlan.from_json(p.to_json()) == p
