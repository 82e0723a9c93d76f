"""Load costs (scheduler/load_cost.py) as literal tables: the bytes a plan's nodes fetch, and plans that prefer the
nodes holding the weights among near-equal layouts."""

import pytest

from ollama_distributed.scheduler import PartitionPlan, PlanConfig, Workload, plan, plan_replicas
from ollama_distributed.scheduler.load_cost import (FileLayout, Holding, TensorExtent, WeightSources, chunks_covering,
                                                    load_costs, prefer_holders, shard_chunks, shard_tensor_names)
from ollama_distributed.scheduler.planner import cost_model

from .helpers import GB, cluster, node, tiny_profile

W = Workload(prompt_tokens=64, output_tokens=64)

# A 2-layer file in 100-byte chunks: header [0, 150), then embd [150, 350), blk.0 [350, 550), blk.1 [550, 750),
# output_norm [750, 760), output [760, 1000).
LAYOUT = FileLayout(size=1000, data_offset=150, chunk_bytes=100, tensors=(
    TensorExtent("token_embd.weight", 150, 200), TensorExtent("blk.0.attn_q.weight", 350, 100),
    TensorExtent("blk.0.ffn_up.weight", 450, 100), TensorExtent("blk.1.attn_q.weight", 550, 100),
    TensorExtent("blk.1.ffn_up.weight", 650, 100), TensorExtent("output_norm.weight", 750, 10),
    TensorExtent("output.weight", 760, 240)))


def test_shard_chunks_follow_the_tensors_and_the_header():
    assert chunks_covering([], 1000, 150, 100) == [0, 1]
    # first stage: header, embedding, blk.0, output_norm (global)
    assert shard_chunks(LAYOUT, (0, 1), True, False) == [0, 1, 2, 3, 4, 5, 7]
    # last stage: header, blk.1, output_norm and head
    assert shard_chunks(LAYOUT, (1, 2), False, True) == [0, 1, 5, 6, 7, 8, 9]
    assert shard_tensor_names(["token_embd.weight", "blk.3.x", "output_norm.weight"], (0, 1), False, True) == [
        "token_embd.weight", "output_norm.weight"]  # tied: the head is the embedding


def test_expert_tensors_fetch_only_the_shards_experts():
    lay = FileLayout(size=1000, data_offset=100, chunk_bytes=100,
                     tensors=(TensorExtent("blk.0.ffn_up_exps.weight", 200, 800, n_expert=8),))
    assert shard_chunks(lay, (0, 1), False, False, experts=(2, 4)) == [0, 4, 5]  # experts 2, 3: [400, 600)
    assert shard_chunks(lay, (0, 1), False, False) == [0, 2, 3, 4, 5, 6, 7, 8, 9]


def _two_stage(a: str, b: str) -> tuple:
    prof = tiny_profile(layers=2)
    spec = cluster(node(a, 1 * GB), node(b, 1 * GB))
    p = plan(prof, spec, W, PlanConfig(strategy="pipeline"))
    return p, spec


def test_load_costs_per_node_literal():
    prof = tiny_profile(layers=2)
    spec = cluster(node("h", 1 * GB), node("n1", 1 * GB), node("n2", 1 * GB), latency=0.0, bandwidth=100.0)
    p = PartitionPlan.from_dict({
        "model": "tiny", "strategy": "pipeline", "reason": "",
        "predicted": {"decode_ms_per_token": 1.0, "prefill_ms": 1.0, "tokens_per_s": 1.0},
        "stages": [{"layers": [0, 1], "shards": [{"node": "n1", "heads": [0, 8], "kv_heads": [0, 4], "ffn": [0, 8],
                                                  "memory_bytes": 1}]},
                   {"layers": [1, 2], "shards": [{"node": "n2", "heads": [0, 8], "kv_heads": [0, 4], "ffn": [0, 8],
                                                  "memory_bytes": 1}]}]})
    nothing = WeightSources("h", {}, LAYOUT)
    got = [(l.node, l.holds, l.fetch_bytes, l.fetch_s) for l in load_costs(p.stages, nothing, spec, prof)]
    assert got == [("n1", "none", 700, 7.0), ("n2", "none", 700, 7.0)]  # 7 chunks each at 100 B/s
    # n1 holds the file; n2's cache holds chunks 0, 1 and 9 (the last one is 100 bytes too)
    some = WeightSources("h", {"n1": Holding(has_file=True), "n2": Holding(chunks=frozenset({0, 1, 9}))}, LAYOUT)
    got = [(l.node, l.holds, l.fetch_bytes, l.fetch_s) for l in load_costs(p.stages, some, spec, prof)]
    assert got == [("n1", "file", 0, 0.0), ("n2", "slice", 400, 4.0)]
    # without a layout, the profile's weight bytes of the shard stand in
    est = load_costs(p.stages, WeightSources("h"), spec, prof)
    layer = prof.n_kv_heads * prof.attn_unit_bytes + prof.ffn_units * prof.ffn_unit_bytes + prof.layer_norm_bytes
    assert [l.fetch_bytes for l in est] == [int(layer + prof.embedding_bytes), int(layer + prof.head_bytes)]


def _one_layer_nodes(prof, *names):
    """Nodes that hold one layer (+ embedding or head) each, never two: a plan must use two of them."""
    layer = cost_model(prof, cluster(node("x", 1 * GB)), W, PlanConfig()).layer_mem
    mem = int(layer * 1.5 + prof.embedding_bytes + prof.head_bytes)
    return cluster(*(node(n, mem) for n in names))


def test_plan_json_carries_the_load_and_round_trips():
    prof = tiny_profile(layers=2)
    spec = _one_layer_nodes(prof, "h", "n1")
    p = plan(prof, spec, W, PlanConfig(strategy="pipeline"), WeightSources("h", {}, LAYOUT))
    d = p.to_dict()
    assert sorted((l["node"], l["holds"], l["fetch_bytes"]) for l in d["load"]) == [("h", "file", 0),
                                                                                    ("n1", "none", 700)]
    assert PartitionPlan.from_dict(d) == p
    # the plan id is the layout's: the same plan with or without the load facts
    assert p.plan_id == plan(prof, spec, W, PlanConfig(strategy="pipeline")).plan_id
    assert "Load: n1 fetches 700 B (~0.0 s)" in p.reason


@pytest.mark.parametrize("holdings, expect", [
    # equal nodes, nothing held: the search's own choice (the first node) stands
    ({}, "a"),
    # c holds the file: the single-node plan moves there
    ({"c": Holding(has_file=True)}, "c"),
    # b holds part of the slice, c all of it (every chunk): c
    ({"b": Holding(chunks=frozenset(range(5))), "c": Holding(chunks=frozenset(range(10)))}, "c"),
    # b holds part: better than nothing
    ({"b": Holding(chunks=frozenset(range(5)))}, "b"),
])
def test_prefers_the_node_holding_the_weights_among_equals(holdings, expect):
    prof = tiny_profile(layers=2)
    spec = cluster(node("a", 1 * GB), node("b", 1 * GB), node("c", 1 * GB))
    sources = WeightSources("head", holdings, LAYOUT, links={n: spec.default_link for n in "abc"})
    p = plan(prof, spec, W, PlanConfig(strategy="single"), sources)
    assert p.nodes == [expect], p.reason
    assert p.load[0].node == expect
    if expect != "a":
        assert "Prefers nodes holding the weights: a→" + expect in p.reason


def test_a_much_faster_node_still_wins_over_a_holder():
    """Within the tolerance a holder is preferred; a node more than that faster keeps the shard."""
    prof = tiny_profile(layers=2)
    held = {"slow": Holding(has_file=True)}
    for speed, tol, expect in ((1.05, 0.1, "slow"), (2.0, 0.1, "fast"), (2.0, 1.5, "slow")):
        spec = cluster(node("fast", 1 * GB, bw=100e9 * speed, flops=10e12 * speed), node("slow", 1 * GB))
        sources = WeightSources("head", held, LAYOUT, links={n: spec.default_link for n in ("fast", "slow")})
        p = plan(prof, spec, W, PlanConfig(strategy="single", load_tolerance=tol), sources)
        assert p.nodes == [expect], (speed, tol, p.reason)
        assert p.predicted == cost_model(prof, spec, W, PlanConfig()).evaluate(p.stages)[0]


def test_recovery_replan_lands_on_the_node_with_the_lost_shards_slice():
    """A PP plan on a, b lost b; c and d are equal survivors, d's cache holds b's slice (the last stage's chunks):
    the re-plan on {a, c, d} puts the last stage on d, and says it fetches nothing."""
    prof = tiny_profile(layers=2)
    survivors = _one_layer_nodes(prof, "a", "c", "d")
    last_slice = frozenset(shard_chunks(LAYOUT, (1, 2), False, True))
    sources = WeightSources("a", {"a": Holding(has_file=True), "d": Holding(chunks=last_slice)}, LAYOUT)
    blind = plan(prof, survivors, W, PlanConfig(strategy="pipeline"))
    p = plan(prof, survivors, W, PlanConfig(strategy="pipeline"), sources)
    assert [st.shards[0].node for st in p.stages] == ["a", "d"], (blind.nodes, p.reason)
    assert [(l.node, l.holds, l.fetch_bytes) for l in p.load] == [("a", "file", 0), ("d", "slice", 0)]
    assert p.predicted.decode_ms_per_token == pytest.approx(blind.predicted.decode_ms_per_token, rel=0.1)


def test_tensor_parallel_exchange_keeps_memory_and_covers():
    """A 2-way tensor-parallel stage over equal a, b with c holding the file: one role moves to c, the plan stays
    valid and within memory."""
    prof = tiny_profile(layers=2)
    spec = cluster(node("a", 1 * GB), node("b", 1 * GB), node("c", 1 * GB))
    sources = WeightSources("c", {"c": Holding(has_file=True)}, LAYOUT)
    p = plan(prof, spec, W, PlanConfig(strategy="tensor", max_tp=2), sources)
    assert "c" in p.nodes and len(p.nodes) == 2
    p.validate(prof)
    cm = cost_model(prof, spec, W, PlanConfig())
    assert cm.check_memory(p.stages) == []


def test_replicas_take_holders_first():
    prof = tiny_profile(layers=2)
    spec = cluster(*(node(n, 1 * GB) for n in "abcd"))
    sources = WeightSources("head", {"c": Holding(has_file=True), "d": Holding(has_file=True)}, LAYOUT,
                            links={n: spec.default_link for n in "abcd"})
    plans = plan_replicas(prof, spec, W, PlanConfig(strategy="single"), 2, sources)
    assert sorted(p.nodes[0] for p in plans) == ["c", "d"]


def test_prefer_holders_is_a_no_op_when_every_node_holds_the_file():
    prof = tiny_profile(layers=4)
    spec = cluster(*(node(n, 1 * GB) for n in "abc"))
    cm = cost_model(prof, spec, W, PlanConfig(strategy="pipeline"))
    base = plan(prof, spec, W, PlanConfig(strategy="pipeline"))
    every = WeightSources("a", {n: Holding(has_file=True) for n in "abc"}, LAYOUT)
    p = prefer_holders(base, cm, every)
    assert p.stages == base.stages and all(l.fetch_bytes == 0 for l in p.load)
    with pytest.raises(ValueError):
        prefer_holders(base, cm, every, tolerance=-1)
