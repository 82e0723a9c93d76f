"""Edge cases as literal tables."""

import re

import pytest

from ollama_distributed.scheduler import InfeasiblePlanError, PlanConfig, Workload, plan, plan_replicas
from ollama_distributed.scheduler.planner import cost_model
from ollama_distributed.scheduler.profile import preset_profile

from .helpers import GB, cluster, node, tiny_profile

W = Workload(prompt_tokens=64, output_tokens=64)


def _layout(p):
    return [(st.layers, [sh.node for sh in st.shards]) for st in p.stages]


def test_one_node_gets_everything():
    prof = tiny_profile(layers=6)
    p = plan(prof, cluster(node("solo", 1 * GB)), W)
    assert p.strategy == "single" and _layout(p) == [((0, 6), ["solo"])]
    sh = p.stages[0].shards[0]
    assert sh.kv_heads == (0, 4) and sh.heads == (0, 8) and sh.ffn == (0, 8)
    with pytest.raises(InfeasiblePlanError, match="needs ≥ 2 nodes"):
        plan(prof, cluster(node("solo", 1 * GB)), W, PlanConfig(strategy="tensor"))


def test_more_nodes_than_layers():
    prof = tiny_profile(layers=3)
    cm = cost_model(prof, cluster(node("x", 1)), W, PlanConfig())
    # each node holds one layer plus embedding and head, never two layers
    mem = cm.layer_mem * 1.5 + prof.embedding_bytes + prof.head_bytes
    p = plan(prof, cluster(*[node(f"n{i}", mem) for i in range(8)]), W, PlanConfig(strategy="pipeline"))
    assert [st.layers for st in p.stages] == [(0, 1), (1, 2), (2, 3)]
    assert len(set(p.nodes)) == 3 and "left out 5 node(s)" in p.reason


def test_node_too_small_for_one_layer_is_left_out_and_alone_is_infeasible():
    prof = tiny_profile(layers=4)
    cm = cost_model(prof, cluster(node("x", 1)), W, PlanConfig())
    tiny = node("tiny", cm.layer_mem * 0.5, bw=1e12)  # 10x faster, but holds half a layer
    big = node("big", 1 * GB, bw=1e11)
    p = plan(prof, cluster(tiny, big), W, PlanConfig(strategy="pipeline"))
    assert p.nodes == ["big"]
    with pytest.raises(InfeasiblePlanError) as info:
        plan(prof, cluster(tiny, node("tiny2", cm.layer_mem * 0.5)), W)
    err = info.value
    assert err.needed_bytes > err.available_bytes
    assert re.search(r"needs [\d.]+ [kMG]?B .*the 2 nodes hold [\d.]+ [kMG]?B", str(err)), str(err)


def test_message_carries_the_numbers():
    # llama-7b in f16 needs 13.5 GB of weights (+ KV cache); three 2.5 GB nodes hold 7.5 GB
    prof = preset_profile("llama-7b")
    c = cluster(*[node(f"n{i}", 2.5 * GB) for i in range(3)])
    with pytest.raises(InfeasiblePlanError, match=r"needs 13\.\d GB .* the 3 nodes hold 7\.5 GB"):
        plan(prof, c, Workload(prompt_tokens=16, output_tokens=16))


FAST_NET = dict(latency=1e-6, bandwidth=1e11)


@pytest.mark.parametrize("n_nodes,expected_heads", [
    (2, [[(0, 6), (6, 9)], [(0, 3), (3, 9)]]),   # 3 KV groups of 3 heads: 2 + 1 (either way round)
    (4, [[(0, 3), (3, 6), (6, 9)]]),             # at most 3 shards: one KV group each, 4th node idle
])
def test_nine_heads_over_two_and_four_nodes(n_nodes, expected_heads):
    prof = preset_profile("smollm2-135m")
    c = cluster(*[node(f"n{i}", 1 * GB) for i in range(n_nodes)], **FAST_NET)
    p = plan(prof, c, W, PlanConfig(strategy="tensor"))
    heads = [sh.heads for sh in p.stages[0].shards]
    assert heads in expected_heads
    assert all(sh.heads == (sh.kv_heads[0] * 3, sh.kv_heads[1] * 3) for sh in p.stages[0].shards)
    # hybrid on 4 nodes: every stage still covers the 9 heads exactly once
    h = plan(prof, c, W, PlanConfig(strategy="hybrid"))
    for st in h.stages:
        assert sorted(x for sh in st.shards for x in range(*sh.heads)) == list(range(9))


def test_ten_times_slower_node_is_excluded_when_that_helps():
    prof = preset_profile("llama-7b")
    W1 = Workload(prompt_tokens=16, output_tokens=16)
    fast = [node(f"fast{i}", 6 * GB, bw=100e9, flops=50e12) for i in range(3)]
    slow = node("slow", 6 * GB, bw=10e9, flops=5e12)
    c = cluster(*fast, slow, **FAST_NET)
    p = plan(prof, c, W1, PlanConfig(strategy="pipeline"))
    assert "slow" not in p.nodes and "left out 1 node(s) that would not help: slow" in p.reason
    # tensor parallelism instead weights shares by speed: the slow node gets about a tenth of a fast one's
    t = plan(prof, c, W1, PlanConfig(strategy="tensor"))
    shares = {sh.node: sh.ffn[1] - sh.ffn[0] for sh in t.stages[0].shards}
    if "slow" in shares:
        assert shares["slow"] <= 0.11 * shares["fast0"]
    # ... but used when the fast nodes cannot hold the model without it
    small = [node(f"fast{i}", 4 * GB, bw=100e9, flops=50e12) for i in range(3)]
    p2 = plan(prof, cluster(*small, slow, **FAST_NET), W1, PlanConfig(strategy="pipeline"))
    assert "slow" in p2.nodes


@pytest.mark.parametrize("latency,expected_nodes", [(2e-4, ["x", "y"]), (50e-3, ["y"])])
def test_slow_link_prefers_fewer_stages(latency, expected_nodes):
    prof = preset_profile("llama-7b")
    x = node("x", 7 * GB, bw=200e9, flops=100e12)   # twice as fast, holds half the layers
    y = node("y", 20 * GB, bw=100e9, flops=50e12)  # holds the whole model
    p = plan(prof, cluster(x, y, latency=latency, bandwidth=1.25e9), Workload(prompt_tokens=16, output_tokens=16),
             PlanConfig(strategy="pipeline"))
    assert sorted(p.nodes) == expected_nodes


def test_throughput_objective_uses_more_stages_than_latency():
    prof = preset_profile("llama-7b")
    c = cluster(*[node(f"n{i}", 20 * GB) for i in range(4)], **FAST_NET)
    w = Workload(prompt_tokens=16, output_tokens=16, concurrency=8)
    lat = plan(prof, c, w, PlanConfig(strategy="pipeline", objective="latency"))
    thr = plan(prof, c, w, PlanConfig(strategy="pipeline", objective="throughput"))
    assert len(lat.stages) == 1 and len(thr.stages) == 4
    assert thr.predicted.tokens_per_s > 3 * lat.predicted.tokens_per_s
    assert [st.layers[1] - st.layers[0] for st in thr.stages] in ([8, 8, 8, 8], [9, 8, 8, 7], [8, 9, 8, 7],
                                                                   [9, 8, 7, 8], [8, 8, 9, 7], [9, 9, 7, 7])


def test_replicas_on_disjoint_nodes():
    prof = tiny_profile(layers=4)
    c = cluster(*[node(f"n{i}", 1 * GB, bw=(i + 1) * 1e10) for i in range(3)])
    reps = plan_replicas(prof, c, W, PlanConfig(strategy="single"))
    assert [r.nodes for r in reps] == [["n2"], ["n1"], ["n0"]]
    assert len(plan_replicas(prof, c, W, PlanConfig(strategy="single"), max_replicas=2)) == 2


def test_tied_embedding_counted_once_on_a_single_node_twice_across_stages():
    prof = tiny_profile(layers=2, vocab=4096, tied=True)
    cm = cost_model(prof, cluster(node("x", 1)), W, PlanConfig())
    one = plan(prof, cluster(node("a", 1 * GB)), W)
    assert one.stages[0].shards[0].memory_bytes == int(2 * cm.layer_mem + prof.embedding_bytes
                                                       + prof.hidden_size * prof.weight_bytes)
    mem = cm.layer_mem * 1.2 + prof.embedding_bytes + prof.hidden_size * prof.weight_bytes
    two = plan(prof, cluster(node("a", mem), node("b", mem)), W, PlanConfig(strategy="pipeline"))
    assert len(two.stages) == 2  # the second copy of the head does not fit next to two layers
    assert two.stages[1].shards[0].memory_bytes == int(cm.layer_mem + prof.head_bytes)


def test_int4_profile_counts_4bit_layers_and_a_float16_head():
    """SmolLM2 in our int4 format (model/quant.py): layers at 4 bits + a bf16 scale and zero per 32 weights
    (0.625 B), the tied embedding/head as a float16 table + 4-bit ranking rows (2.625 B). 140.81 MB is what
    ModelShard.weight_bytes() reports for the int4 SmolLM2 shard, which also holds its norms in float32 (the
    profile counts them at 0.625 B)."""
    prof = preset_profile("smollm2-135m", "int4")
    layer_params = 3 * (2 * 3 + 2) * 64 * 576 + 1536 * 3 * 576 + 2 * 576  # KV groups + FFN columns + norms
    assert prof.layer_bytes == layer_params * 0.625
    assert prof.embedding_bytes == 49152 * 576 * 2.625
    assert prof.head_extra_bytes(True) == 576 * 0.625  # tied head beside the embedding: only the final norm
    assert prof.head_extra_bytes(False) == 49152 * 576 * 2.625 + 576 * 0.625
    assert prof.total_weight_bytes == 30 * layer_params * 0.625 + 49152 * 576 * 2.625 + 576 * 0.625 == 140_694_984
    assert prof.kv_bytes == prof.act_bytes == 4  # float32 residual stream and cache
    f32 = preset_profile("smollm2-135m", "f32")
    assert f32.embed_bytes == 0 and f32.total_weight_bytes == f32.total_params * 4
