"""Mixture-of-experts models in the planner, as literal tables: memory by total parameters, bandwidth and FLOPs
by active ones, experts assigned to nodes as whole experts in proportion to speed and memory, pipeline stages
holding every expert of their layers, and the Qwen3-MoE presets."""

import json
from dataclasses import replace

import pytest

from ollama_distributed.scheduler import ModelProfile, PlanConfig, Workload, plan
from ollama_distributed.scheduler.errors import PlanFormatError
from ollama_distributed.scheduler.plan import PartitionPlan
from ollama_distributed.scheduler.planner import cost_model
from ollama_distributed.scheduler.profile import preset_profile

from .helpers import GB, cluster, node

W = Workload(prompt_tokens=64, output_tokens=64)


def moe_profile(layers: int = 4, n_expert: int = 8, used: int = 2) -> ModelProfile:
    # hidden 64, 4 KV groups of 2 query heads of 16, experts of 32 columns, 2 bytes per weight
    return ModelProfile("tiny-moe", layers, 64, 8, 4, 16, 32, 256, context_length=4096, weight_bytes=2.0,
                        kv_bytes=2.0, act_bytes=2.0, n_expert=n_expert, n_expert_used=used)


def test_parameters_total_and_active():
    p = moe_profile()
    # attention unit (2g+2)·d·H = 6·16·64; expert 3·F·H = 3·32·64; norms 2H + router 8·H
    assert (p.attn_unit_params, p.ffn_unit_params, p.layer_norm_params) == (6144, 6144, 640)
    assert p.layer_params == 4 * 6144 + 8 * 6144 + 640 == 74368
    # embedding and untied head (+ final norm): 256·64 + 256·64 + 64
    assert p.total_params == 4 * 74368 + 16384 + 16448
    assert p.active_params == 4 * (4 * 6144 + 2 * 6144 + 640) + 16384 + 16448
    assert (p.ffn_units, p.active_ffn_units, p.ffn_step) == (8, 2, 1)


@pytest.mark.parametrize("name, total_b, active_b", [
    ("qwen3-30b-a3b", 30.53, 3.35),  # published: 30.5B total, 3.3B activated
    ("qwen3-235b-a22b", 235.09, 22.19),  # published: 235B total, 22B activated
])
def test_presets_count_published_sizes(name, total_b, active_b):
    p = preset_profile(name, "bf16")
    assert round(p.total_params / 1e9, 2) == total_b and round(p.active_params / 1e9, 2) == active_b
    assert p.total_weight_bytes == 2 * p.total_params


@pytest.mark.parametrize("concurrency, read_fraction", [(1, 0.25), (2, 0.4375), (4, 0.68359375)])
def test_memory_by_total_bandwidth_by_active(concurrency, read_fraction):
    """A step of b tokens reads 1 − (1 − k/n)^b of the experts (k/n = 2/8) and computes k/n of their FLOPs; memory
    holds all 8."""
    p = moe_profile()
    bw, flops = 100e9, 1e18  # memory-bound
    cm = cost_model(p, cluster(node("a", 1 * GB, bw=bw, flops=flops)), Workload(64, 64, concurrency=concurrency),
                    PlanConfig())
    assert cm.ffn_unit_mem == 6144 * 2
    assert cm.layer_mem == 4 * cm.attn_unit_mem + 8 * 6144 * 2 + 640 * 2
    assert cm.rates["a"].tau_ffn == pytest.approx(6144 * 2 * read_fraction / bw, rel=1e-12)
    compute_bound = cost_model(p, cluster(node("a", 1 * GB, bw=1e18, flops=1e12)),
                               Workload(64, 64, concurrency=concurrency), PlanConfig())
    assert compute_bound.rates["a"].tau_ffn == pytest.approx(concurrency * 2 * 6144 * 0.25 / 1e12, rel=1e-12)


def _experts(p: PartitionPlan) -> list[list[tuple[str, tuple[int, int]]]]:
    return [[(sh.node, sh.experts) for sh in st.shards] for st in p.stages]


@pytest.mark.parametrize("bandwidths, experts", [
    ((100e9, 100e9), [(0, 4), (4, 8)]),
    ((200e9, 100e9, 100e9, 0), [(0, 4), (4, 6), (6, 8)]),
    ((300e9, 100e9), [(0, 6), (6, 8)]),
])
def test_tensor_plan_splits_whole_experts_by_speed(bandwidths, experts):
    nodes = [node(n, 1 * GB, bw=b) for n, b in zip("abc", bandwidths) if b]
    # (a fast network, so every node is worth its all-reduces)
    p = plan(moe_profile(), cluster(*nodes, latency=1e-9, bandwidth=1e15), W,
             PlanConfig(strategy="tensor", max_tp=len(nodes)))
    got = sorted(sh.experts for sh in p.stages[0].shards)
    assert got == experts
    for sh in p.stages[0].shards:
        assert sh.ffn == (0, 32)  # whole experts: every column of the ones held
    assert "experts" in p.reason
    PartitionPlan.from_dict(p.to_dict()).validate(moe_profile())


def test_tensor_plan_experts_follow_memory():
    """Equal speed, but node a holds only 2 experts per layer besides its attention share: b takes the other 6."""
    prof = moe_profile()
    cm = cost_model(prof, cluster(node("x", 1)), W, PlanConfig())
    small = prof.n_layers * (2 * cm.attn_unit_mem + 2 * cm.ffn_unit_mem + cm.norm_mem) + cm.extras_mem(True, True)
    p = plan(prof, cluster(node("a", small + 100), node("b", 1 * GB)), W, PlanConfig(strategy="tensor"))
    assert dict((n, e) for n, e in _experts(p)[0]) == {"a": (0, 2), "b": (2, 8)}
    for sh in p.stages[0].shards:
        assert sh.memory_bytes <= (small + 100 if sh.node == "a" else 1 * GB)


def test_pipeline_stage_holds_every_expert_of_its_layers():
    prof = moe_profile(layers=4)
    cm = cost_model(prof, cluster(node("x", 1)), W, PlanConfig())
    p = plan(prof, cluster(node("a", 2.5 * cm.layer_mem + cm.extras_mem(True, False)),
                           node("b", 2.5 * cm.layer_mem + cm.extras_mem(False, True))), W,
             PlanConfig(strategy="pipeline"))
    assert [st.layers for st in p.stages] == [(0, 2), (2, 4)]
    for i, st in enumerate(p.stages):
        (sh,) = st.shards
        assert sh.experts == (0, 8) and sh.ffn == (0, 32)
        assert sh.memory_bytes == int(2 * cm.layer_mem + cm.extras_mem(i == 0, i == 1))


def test_hybrid_plan_splits_experts_within_each_stage():
    """Four equal nodes, each able to hold ~1.3 layers: two stages of two layers, each a 2-way group with half the
    KV groups and half the experts per node."""
    prof = moe_profile(layers=4)
    cm = cost_model(prof, cluster(node("x", 1)), W, PlanConfig())
    mem = 1.3 * cm.layer_mem + cm.extras_mem(True, True)
    p = plan(prof, cluster(*[node(f"n{i}", mem) for i in range(4)], latency=1e-9, bandwidth=1e15), W,
             PlanConfig(strategy="hybrid"))
    assert [(st.layers, [(sh.kv_heads, sh.experts) for sh in st.shards]) for st in p.stages] == [
        ((0, 2), [((0, 2), (0, 4)), ((2, 4), (4, 8))]),
        ((2, 4), [((0, 2), (0, 4)), ((2, 4), (4, 8))]),
    ]
    p.validate(prof)


def test_plan_json_carries_experts_and_rejects_gaps():
    p = plan(moe_profile(), cluster(node("a", 1 * GB), node("b", 1 * GB)), W, PlanConfig(strategy="tensor"))
    d = p.to_dict()
    assert [sh["experts"] for sh in d["stages"][0]["shards"]] == [[0, 4], [4, 8]]
    specs = PartitionPlan.from_dict(d).shard_specs(preset_cfg_like(moe_profile()))
    assert [s.experts for s in specs[0]] == [(0, 4), (4, 8)]
    d["stages"][0]["shards"][1]["experts"] = [5, 8]
    del d["plan_id"]
    with pytest.raises(PlanFormatError, match="experts"):
        PartitionPlan.from_dict(d).validate(moe_profile())
    # a dense plan's JSON is unchanged: no experts key
    dense = plan(preset_profile("llama3.2-1b"), cluster(node("a", 8 * GB)), W)
    assert "experts" not in dense.to_dict()["stages"][0]["shards"][0]


def preset_cfg_like(p: ModelProfile):
    from ollama_distributed.model.config import ModelConfig

    return ModelConfig(arch="qwen3moe", n_layers=p.n_layers, hidden_size=p.hidden_size, n_heads=p.n_heads,
                       n_kv_heads=p.n_kv_heads, head_dim=p.head_dim, ffn_size=p.ffn_size, vocab_size=p.vocab_size,
                       context_length=p.context_length, n_expert=p.n_expert, n_expert_used=p.n_expert_used)


def test_qwen3_235b_plans_on_a_cluster_that_holds_it():
    """Q4_K_M (auto for a preset): ~142 GB of weights over 64 + 48 + 32 GB."""
    prof = preset_profile("qwen3-235b-a22b", "auto")
    nodes = cluster(node("a", 64 * GB, bw=400e9), node("b", 48 * GB, bw=300e9), node("c", 32 * GB, bw=200e9),
                    bandwidth=1.25e9, latency=1e-4)
    for strategy in ("pipeline", "tensor"):
        p = plan(prof, nodes, W, PlanConfig(strategy=strategy))
        p.validate(prof)
        for st in p.stages:
            held = sorted(sh.experts for sh in st.shards)
            assert held[0][0] == 0 and held[-1][1] == 128
        if strategy == "tensor":
            # more experts to the node with more memory and bandwidth
            by_node = {sh.node: sh.experts[1] - sh.experts[0] for sh in p.stages[0].shards}
            assert by_node["a"] > by_node["b"] > by_node["c"] and sum(by_node.values()) == 128
    # and the smaller one fits one 24 GB node whole
    small = plan(preset_profile("qwen3-30b-a3b", "auto"), cluster(node("gpu", 24 * GB)), W)
    assert small.strategy == "single" and small.stages[0].shards[0].experts == (0, 128)


def test_plan_cli_shows_experts(tmp_path):
    """`plan --model qwen3-235b-a22b` answers for a cluster that holds it, with an experts column, the active
    parameters, and a JSON plan naming each node's experts; a Qwen3-MoE GGUF is read from its header alike."""
    from typer.testing import CliRunner

    from ollama_distributed.cli import app
    from tests.helpers.tiny_gguf import write_tiny_qwen3moe_gguf

    cluster_yaml = tmp_path / "cluster.yaml"
    cluster_yaml.write_text("nodes:\n"
                            "  - {name: a, memory: 64GB, memory_bandwidth: 400GB/s, flops: 20TFLOPS}\n"
                            "  - {name: b, memory: 48GB, memory_bandwidth: 300GB/s, flops: 20TFLOPS}\n"
                            "  - {name: c, memory: 32GB, memory_bandwidth: 200GB/s, flops: 10TFLOPS}\n"
                            "links:\n  default: {latency: 0.1ms, bandwidth: 10Gbit/s}\n")
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "-m", "qwen3-235b-a22b", "-c", str(cluster_yaml), "--strategy", "tensor"],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "experts" in res.stdout and "22.2B of 235.1B parameters active" in res.stdout
    res = runner.invoke(app, ["plan", "-m", "qwen3-235b-a22b", "-c", str(cluster_yaml), "--strategy", "tensor",
                              "--json"])
    d = PartitionPlan.from_json(res.stdout)
    d.validate(preset_profile("qwen3-235b-a22b", "auto"))
    assert sum(sh.experts[1] - sh.experts[0] for sh in d.stages[0].shards) == 128
    gguf_file = write_tiny_qwen3moe_gguf(tmp_path / "moe.gguf", dtype="q8_0")
    res = runner.invoke(app, ["plan", "-m", str(gguf_file), "-c", str(cluster_yaml), "--json"])
    assert res.exit_code == 0, res.output
    assert all(sh["experts"] == [0, 8] for st in json.loads(res.stdout)["stages"] for sh in st["shards"])


def shared_expert_profile() -> ModelProfile:
    # moe_profile with a qwen2moe shared expert of 16 columns: gate, up, down 3·16·64 + its gate vector 64
    return replace(moe_profile(), shared_expert_ffn=16)


def test_shared_expert_counted_once_per_stage():
    """The engine computes a stage's shared expert on the one shard whose experts start at 0 (model/moe.py
    holds_shared_expert); a plan counts its bytes there and nowhere else in the stage."""
    p = shared_expert_profile()
    assert (p.shared_expert_params, p.layer_norm_params) == (3136, 640 + 3136)
    assert p.layer_params == 4 * 6144 + 8 * 6144 + 640 + 3136  # the model holds it once per layer
    assert p.active_params == 4 * (4 * 6144 + 2 * 6144 + 640 + 3136) + 16384 + 16448  # every token runs it
    # Per layer: a KV group 6144·2 weight bytes + 2·16·2 cache bytes × 128 tokens = 20480; an expert
    # 6144·2 = 12288; norms + router 640·2 = 1280; the shared expert 3136·2 = 6272. Embedding 256·64·2 = 32768 on
    # every shard of the first stage; the untied head 256·64·2 + 64·2 = 32896 on the last stage's first shard.
    layer_with, layer_without = 2 * 20480 + 4 * 12288 + 1280 + 6272, 2 * 20480 + 4 * 12288 + 1280
    tensor = plan(p, cluster(node("a", 1 * GB), node("b", 1 * GB), latency=1e-9, bandwidth=1e15), W,
                  PlanConfig(strategy="tensor", max_tp=2))
    assert [(sh.node, sh.experts, sh.memory_bytes) for sh in tensor.stages[0].shards] == [
        ("a", (0, 4), 4 * layer_with + 32768 + 32896),  # 456320
        ("b", (4, 8), 4 * layer_without + 32768),  # 398336 (before: counted with the shared expert, 423424)
    ]
    # two stages of TP-2 (nodes of 256 KiB hold 2 layers each): the shared expert on a and on c
    hybrid = plan(p, cluster(*[node(n, 262144) for n in "abcd"], latency=1e-9, bandwidth=1e15), W,
                  PlanConfig(strategy="hybrid", max_tp=2))
    assert [[(sh.node, sh.experts, sh.memory_bytes) for sh in st.shards] for st in hybrid.stages] == [
        [("a", (0, 4), 2 * layer_with + 32768), ("b", (4, 8), 2 * layer_without + 32768)],
        [("c", (0, 4), 2 * layer_with + 32896), ("d", (4, 8), 2 * layer_without)],
    ]
    single = plan(p, cluster(node("a", 1 * GB)), W, PlanConfig(strategy="single"))
    assert single.stages[0].shards[0].memory_bytes == 4 * (4 * 20480 + 8 * 12288 + 1280 + 6272) + 32768 + 32896


def test_shared_expert_fits_where_counting_it_twice_did_not():
    """Two nodes just large enough for their shares: the one without the shared expert needs 6272 bytes a layer
    less, so a node that small still takes the second half of the experts."""
    p = shared_expert_profile()
    need_b = 4 * (2 * 20480 + 4 * 12288 + 1280) + 32768  # 398336
    spec = cluster(node("a", 1 * GB), node("b", need_b), latency=1e-9, bandwidth=1e15)
    got = plan(p, spec, W, PlanConfig(strategy="tensor", max_tp=2))
    assert [(sh.node, sh.experts, sh.memory_bytes) for sh in got.stages[0].shards][1] == ("b", (4, 8), need_b)
