"""Qwen3-MoE (model/moe.py) on tiny random GGUFs: vs transformers loading the same file, expert-parallel and
pipeline shards vs the unsharded engine, and decode reading only the experts the router chose.

Relative error = max|ours - ref| / max|ref| (tests/model/test_transformer.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ollama_distributed.model.shard import ShardSpec
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.model.weights import load_weights, read_config
from tests.helpers.tiny_gguf import write_tiny_qwen3moe_gguf
from tests.model.test_sharded import check_plan, reference_outputs
from tests.model.test_transformer import hf_greedy, hf_logits, ours_greedy_batched, ours_prefill_all, rel_err, tiny_prompts

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
GREEDY = 32
N_EXPERT, TOP_K, EXPERT_FFN = 8, 3, 64


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    """`make(dtype) -> Path`: a tiny qwen3moe GGUF (3 layers, hidden 64, 4 q / 2 kv heads of 32, 8 experts of
    FFN 64, top-3), one per dtype, each alone in its directory (transformers loads a directory + file name)."""
    cache = {}

    def make(dtype: str = "f32"):
        if dtype not in cache:
            cache[dtype] = write_tiny_qwen3moe_gguf(tmp_path_factory.mktemp(f"moe_{dtype}") / "tiny.gguf", dtype=dtype,
                                                    n_expert=N_EXPERT, n_expert_used=TOP_K, expert_ffn=EXPERT_FFN)
        return cache[dtype]

    return make


def hf_moe(path) -> torch.nn.Module:
    # transformers' GGUF loader does not read expert_feed_forward_length (its qwen3_moe key map lacks it)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                moe_intermediate_size=EXPERT_FFN).eval()


def test_config_reads_the_experts(moe_gguf):
    cfg = read_config(moe_gguf())
    assert (cfg.arch, cfg.n_expert, cfg.n_expert_used, cfg.ffn_size, cfg.qk_norm) == ("qwen3moe", 8, 3, 64, True)
    assert cfg.norm_topk_prob and cfg.head_dim == 32


def test_logits_and_greedy_match_transformers(moe_gguf):
    path = moe_gguf()
    ours, ref = ModelShard.from_file(path), hf_moe(path)
    prompts = tiny_prompts(ours.cfg.vocab_size)
    for prompt, got in zip(prompts, ours_prefill_all(ours, prompts)):
        assert rel_err(got, hf_logits(ref, prompt)) <= 1e-4
    for prompt, tokens in zip(prompts, ours_greedy_batched(ours, prompts, GREEDY)):
        assert tokens == hf_greedy(ref, prompt, GREEDY)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_native_experts_stay_in_the_files_type(moe_gguf, dtype):
    """--dtype auto: the experts are kept as the file's blocks (a shard holds about the file's bytes) and compute
    what transformers computes from the same blocks (bounds of tests/model/test_file_format.py: our kernels
    quantise activations; float32 KV cache)."""
    path = moe_gguf(dtype)
    ours = ModelShard.from_file(path, quant="native", kv_dtype=torch.float32)
    from ollama_distributed.model.weights import open_gguf

    file_bytes = sum(int(t.n_bytes) for t in open_gguf(path).tensors)
    # (Q4_0's repacked blocks carry derived per-block terms: ~11% over the file on these tiny matrices)
    assert 0.95 * file_bytes <= ours.weight_bytes() <= (1.1 if dtype == "q8_0" else 1.15) * file_bytes
    assert ours.weight_bytes() < 0.5 * ModelShard.from_file(path).weight_bytes()  # float32 holds 4 bytes a weight
    ref = hf_moe(path)
    prompts = tiny_prompts(ours.cfg.vocab_size)
    for prompt, got in zip(prompts, ours_prefill_all(ours, prompts)):
        assert rel_err(got, hf_logits(ref, prompt)) <= 1e-3
    for prompt, tokens in zip(prompts[:2], ours_greedy_batched(ours, prompts[:2], GREEDY)):
        assert tokens == hf_greedy(ref, prompt, GREEDY)


def spec(layers, kv, ffn, experts, emb, out) -> ShardSpec:
    return ShardSpec(layers, kv, ffn, emb, out, experts)


# plan[stage][rank]; 3 layers, 2 KV heads, FFN 64, 8 experts
PLANS = {
    # expert parallel inside the TP group: attention by KV head, experts 3 + 5 (uneven)
    "ep2-uneven": [[spec((0, 3), (0, 1), (0, 64), (0, 3), True, True),
                    spec((0, 3), (1, 2), (0, 64), (3, 8), True, False)]],
    # one rank holds no experts at all (attention only)
    "ep2-empty": [[spec((0, 3), (0, 1), (0, 64), (0, 8), True, True),
                   spec((0, 3), (1, 2), (0, 64), (8, 8), True, False)]],
    # tensor parallel within the experts: every rank holds every expert, half of each one's FFN columns
    "tp2-expert-columns": [[spec((0, 3), (0, 1), (0, 32), None, True, True),
                            spec((0, 3), (1, 2), (32, 64), None, True, False)]],
    "pp2": [[spec((0, 1), (0, 2), (0, 64), None, True, False)], [spec((1, 3), (0, 2), (0, 64), None, False, True)]],
    "pp2xep2": [[spec((0, 2), (0, 1), (0, 64), (0, 5), True, False), spec((0, 2), (1, 2), (0, 64), (5, 8), True, False)],
                [spec((2, 3), (0, 1), (0, 64), (0, 2), False, True), spec((2, 3), (1, 2), (0, 64), (2, 8), False, False)]],
}


@pytest.mark.parametrize("plan", list(PLANS))
def test_sharded_equals_unsharded(moe_gguf, plan):
    path = moe_gguf()
    check_plan(PLANS[plan], lambda s: ModelShard.from_file(path, s), reference_outputs(ModelShard.from_file(path)),
               read_config(path).vocab_size)


def test_expert_parallel_shard_reads_only_its_experts(moe_gguf):
    path = moe_gguf("q8_0")
    cfg = read_config(path)
    names = {n for n in load_weights(path, cfg, spec((0, 3), (0, 2), (0, 64), (2, 5), False, False), quant="native")}
    held = {int(n.split(".")[3]) for n in names if ".experts." in n}
    assert held == {2, 3, 4} and all(f"layers.{i}.router" in names for i in range(3))
    sizes = [ModelShard.from_file(path, spec((0, 3), (0, 2), (0, 64), e, False, False), quant="native").weight_bytes()
             for e in ((0, 2), (0, 6))]
    per_expert = (sizes[1] - sizes[0]) / 4
    # 3 layers x (gate + up + down) of 64 x 64 in Q8_0 (34 bytes per 32 weights)
    assert math.isclose(per_expert, 3 * 3 * 64 * 64 * 34 / 32, rel_tol=0.1)


@pytest.mark.parametrize("n_seqs", [1, 2])
def test_decode_reads_only_the_chosen_experts(moe_gguf, n_seqs):
    """Poison every expert the router did not choose for a decode step with NaN: the step's logits are unchanged
    (any read of a poisoned expert, even at weight 0, would make them NaN). One sequence (the one-token path) and
    two decoded together (experts chosen by either)."""
    path = moe_gguf()
    prompts = [torch.tensor([5, 77, 300, 12, 9]), torch.tensor([8, 900, 3])][:n_seqs]
    tokens, ids = torch.tensor([41, 600][:n_seqs]), list(range(n_seqs))
    clean, poisoned = ModelShard.from_file(path), ModelShard.from_file(path)
    caches = [m.new_cache(64) for m in (clean, poisoned)]
    chosen: list[set[int]] = []
    for layer in clean.layers:  # record which experts the decode step routes to, layer by layer
        route = layer.moe.route

        def recording(x, route=route):
            weights, ids = route(x)
            chosen.append(set(ids.flatten().tolist()))
            return weights, ids

        layer.moe.route = recording
    for m, cache in zip((clean, poisoned), caches):
        m.forward(torch.cat(prompts), ids, [len(p) for p in prompts], cache)
    chosen.clear()
    want = clean.forward(tokens, ids, [1] * n_seqs, caches[0])
    assert len(chosen) == clean.cfg.n_layers and all(TOP_K <= len(c) < N_EXPERT for c in chosen)
    for layer, used in zip(poisoned.layers, chosen):
        for e in set(range(N_EXPERT)) - used:
            layer.moe.wgu[e].fill_(float("nan"))
            layer.moe.wdown[e].fill_(float("nan"))
    got = poisoned.forward(tokens, ids, [1] * n_seqs, caches[1])
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=0, atol=0)
    # and the poison is real: routing a token to a poisoned expert makes NaN
    other = poisoned.forward(torch.tensor([1000]), [7], [1], poisoned.new_cache(8))
    assert not torch.isfinite(other).all()


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_planner_profile_counts_the_files_bytes(moe_gguf, dtype):
    """The scheduler's profile of an MoE file (`--dtype auto`) holds exactly its tensors' bytes, an expert per FFN
    unit, and plans with the engine's ShardSpecs (experts) that load and run."""
    from ollama_distributed.runtime.distributed_run import model_profile
    from ollama_distributed.model.weights import open_gguf
    from ollama_distributed.scheduler import PlanConfig, Workload, plan
    from tests.scheduler.helpers import cluster, node

    path = moe_gguf(dtype)
    prof = model_profile(path, "auto")
    file_bytes = sum(int(t.n_bytes) for t in open_gguf(path).tensors)
    assert prof.total_weight_bytes == pytest.approx(file_bytes, rel=1e-9)
    assert (prof.n_expert, prof.n_expert_used, prof.ffn_units) == (N_EXPERT, TOP_K, N_EXPERT)
    expert = sum(int(t.n_bytes) for t in open_gguf(path).tensors if "_exps" in t.name) / (3 * N_EXPERT)
    assert prof.ffn_unit_bytes == pytest.approx(expert, rel=1e-9)
    two = cluster(node("a", 10**9), node("b", 10**9), latency=1e-9, bandwidth=1e15)
    chosen = plan(prof, two, Workload(16, 16, context_tokens=64), PlanConfig(strategy="tensor"))
    specs = chosen.shard_specs(read_config(path))[0]
    assert sorted(s.experts for s in specs) == [(0, 4), (4, 8)]
    check_plan([specs], lambda s: ModelShard.from_file(path, s, quant="native", kv_dtype=torch.float32),
               reference_outputs(ModelShard.from_file(path, quant="native", kv_dtype=torch.float32)), prof.vocab_size,
               tol=2e-4)  # (our kernels' activation rounding, test_file_format.py)


# --- qwen2moe: a shared expert beside the routed ones -----------------------------------------------------------
SHARED_FFN = 96


@pytest.fixture(scope="module")
def qwen2moe_gguf(tmp_path_factory):
    """A tiny Qwen2-MoE (q/k/v biases, top-k weights not renormalised, a shared expert of FFN 96 with its sigmoid
    gate); head_dim 16 = hidden / heads (transformers' qwen2_moe reads no head_dim)."""
    return write_tiny_qwen3moe_gguf(tmp_path_factory.mktemp("qwen2moe") / "tiny.gguf", arch="qwen2moe",
                                    head_dim=16, n_expert=N_EXPERT, n_expert_used=TOP_K, expert_ffn=EXPERT_FFN,
                                    shared_expert_ffn=SHARED_FFN)


def test_shared_expert_matches_transformers(qwen2moe_gguf):
    path = qwen2moe_gguf
    cfg = read_config(path)
    assert (cfg.arch, cfg.shared_expert_ffn, cfg.norm_topk_prob, cfg.attention_bias) == ("qwen2moe", 96, False, True)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                               moe_intermediate_size=EXPERT_FFN,
                                               shared_expert_intermediate_size=SHARED_FFN).eval()
    ours = ModelShard.from_file(path)
    prompts = tiny_prompts(cfg.vocab_size)
    for prompt, got in zip(prompts, ours_prefill_all(ours, prompts)):
        assert rel_err(got, hf_logits(ref, prompt)) <= 1e-4
    for prompt, tokens in zip(prompts, ours_greedy_batched(ours, prompts, GREEDY)):
        assert tokens == hf_greedy(ref, prompt, GREEDY)


@pytest.mark.parametrize("plan", ["ep2-uneven", "ep2-empty", "tp2-expert-columns", "pp2xep2"])
def test_shared_expert_sharded_equals_unsharded(qwen2moe_gguf, plan):
    """The shared expert sits whole on one shard of each stage (its output joins the all-reduce once)."""
    path = qwen2moe_gguf
    cfg = read_config(path)
    shards = [[ModelShard.from_file(path, s) for s in stage] for stage in PLANS[plan]]
    for stage in shards:
        assert sum(layer.moe.shared is not None for s in stage for layer in s.layers[:1]) == 1
    check_plan(shards, lambda shard: shard, reference_outputs(ModelShard.from_file(path)), cfg.vocab_size)


@pytest.mark.parametrize("fmt", ["auto", "float32"])
def test_planner_counts_the_shared_expert(qwen2moe_gguf, fmt):
    """An all-F32 file: the profile from its header (auto) and from its shapes (float32) both hold its bytes."""
    from ollama_distributed.runtime.distributed_run import model_profile
    from ollama_distributed.model.weights import open_gguf

    tensors = open_gguf(qwen2moe_gguf).tensors
    file_bytes = sum(int(t.n_bytes) for t in tensors)
    profile = model_profile(qwen2moe_gguf, fmt)
    assert profile.total_weight_bytes == pytest.approx(file_bytes, rel=1e-9)
    # the shared expert's part, which plans count on one shard of a stage (tests/scheduler/test_moe_plans.py)
    shexp = sum(int(t.n_bytes) for t in tensors if "_shexp." in t.name) / profile.n_layers
    assert profile.shared_expert_bytes == pytest.approx(shexp, rel=1e-9) and shexp > 0
