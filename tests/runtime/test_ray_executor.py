"""RayExecutor on a real 4-node local Ray cluster: every plan shape gives the single-process model's tokens.

Reference: LocalExecutor (one in-process ModelShard holding the whole model). Each plan must produce identical
greedy tokens and last-token logits within 1e-4 (relative to the largest logit), with each shard on the node its
plan names — checked by asking the actor for its Ray node id and pid, not by trusting the executor.
"""

from __future__ import annotations

import time

import psutil
import pytest
import torch

from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.executor import Executor, ExecutorError
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.placement import PlacementError, shard_specs, shard_weight_bytes, uniform_plan
from ollama_distributed.runtime.ray_executor import RayExecutor

pytestmark = pytest.mark.slow

SHAPES = {
    "pp2": [["node1"], ["node2"]],
    "pp3": [["node1"], ["node2"], ["node3"]],
    "tp2": [["node1", "node2"]],  # 3 KV groups over 2 shards: 2 + 1 (uneven)
    "tp3": [["node1", "node2", "node3"]],
    "hybrid2x2": [["node0", "node1"], ["node2", "node3"]],
}
PROMPTS = [[1, 17, 42, 99, 7], [5, 6], [300, 2, 2, 8, 1000, 4, 12], [11]]


def greedy(ex, seq_id: int, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    logits = ex.step([seq_id], [prompt])
    out, all_logits = [], [logits[0]]
    for _ in range(n):
        tok = int(logits[0].argmax())
        out.append(tok)
        logits = ex.step([seq_id], [[tok]])
        all_logits.append(logits[0])
    ex.free(seq_id)
    return out, all_logits


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err <= tol, f"max relative logit error {err:.3g} > {tol}"


def check_placement(ex: RayExecutor, cluster) -> None:
    """Every shard runs on the node the plan names (node id asked of the actor) in its own process."""
    live = ex.shard_info()
    pids = set()
    placed = ex.placement()
    for info in live:
        assert info["node_id"] == cluster.node_id(info["node"]), f"shard on {info['node']} runs elsewhere"
        shard = placed["stages"][info["stage"]]["shards"][info["index"]]
        assert shard["node_id"] == info["node_id"] and shard["pid"] == info["pid"]
        pids.add(info["pid"])
    assert len(pids) == len(live) and psutil.Process().pid not in pids


@pytest.fixture(scope="module")
def tiny_ref(tiny_gguf):
    ex = LocalExecutor(tiny_gguf, max_seq_len=256)
    yield {i: greedy(ex, i, p, 6) for i, p in enumerate(PROMPTS[:2])}
    ex.close()


# Every node of the test cluster is on this host, so each stage-to-stage hop, each multi-shard stage's sum and each
# feed of sampled tokens from the output rank to stage 0 runs over shared memory (runtime/shm_comm.py): (hops,
# ranks summing there, feeds). "-gloo": the same plan with shared memory off, i.e. the path shards on different
# machines take.
SHM_PATHS = {"pp2": (1, 0, 1), "pp3": (2, 0, 1), "tp2": (0, 2, 1), "tp3": (0, 3, 2), "hybrid2x2": (2, 4, 2)}


@pytest.mark.parametrize("shape", [*SHAPES, "pp2-gloo", "hybrid2x2-gloo"])
def test_tiny_plans_match_single_process(shape, tiny_gguf, tiny_ref, ray_cluster, monkeypatch):
    cfg = read_config(tiny_gguf)
    gloo = shape.endswith("-gloo")
    shape = shape.removesuffix("-gloo")
    if gloo:
        monkeypatch.setenv("OLLAMA_DISTRIBUTED_SHM_COMM", "0")
    ex = RayExecutor(uniform_plan(cfg, SHAPES[shape], "tiny"), tiny_gguf, ray_cluster, max_seq_len=256)
    try:
        assert isinstance(ex, Executor)
        check_placement(ex, ray_cluster)
        hops, summing, feeds = (0, 0, 0) if gloo else SHM_PATHS[shape]
        assert sum(p["hops_out"] for p in ex.shm_paths) == sum(p["hops_in"] for p in ex.shm_paths) == hops
        assert sum(p["all_reduce"] for p in ex.shm_paths) == summing
        assert sum(p["feeds_out"] for p in ex.shm_paths) == sum(p["feeds_in"] for p in ex.shm_paths) == feeds
        for i, p in enumerate(PROMPTS[:2]):
            toks, logits = greedy(ex, i, p, 6)
            ref_toks, ref_logits = tiny_ref[i]
            assert toks == ref_toks
            for a, b in zip(logits, ref_logits):
                assert_close(a, b)
        assert ex.cached_sequences() == set()
        stage_ms = ex.decode_stage_ms()  # measured per-stage decode step times, for calibration
        assert stage_ms is not None and len(stage_ms) == len(SHAPES[shape]) and min(stage_ms) > 0
    finally:
        ex.close()


def test_ray_object_transport_matches(tiny_gguf, tiny_ref, ray_cluster):
    cfg = read_config(tiny_gguf)
    ex = RayExecutor(uniform_plan(cfg, [["node1"], ["node2", "node3"]], "tiny"), tiny_gguf, ray_cluster,
                     max_seq_len=256, transport="ray")
    try:
        toks, logits = greedy(ex, 0, PROMPTS[0], 6)
        assert toks == tiny_ref[0][0]
        assert_close(logits[-1], tiny_ref[0][1][-1])
    finally:
        ex.close()


SAMPLING = [
    {"temperature": 0, "seed": 1},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 7},
    {"temperature": 1.2, "min_p": 0.05, "repeat_penalty": 1.3, "presence_penalty": 0.2, "frequency_penalty": 0.1,
     "repeat_last_n": 8, "seed": 3},
    {"temperature": 0.7, "typical_p": 0.8, "seed": 11},
]


def sampled_run(step, samplers: list, n: int) -> list[list[int]]:
    """Decode n tokens for len(samplers) sequences in one batch, PROMPTS[i] + [20 + i] each, starting with a prefill step in
    which only the even sequences are complete (the odd ones get their last prompt token in the next step)."""
    hist = [list(PROMPTS[i]) + [20 + i] for i in range(len(samplers))]
    fed = [len(p) - (i % 2) for i, p in enumerate(hist)]
    out: list[list[int]] = [[] for _ in samplers]
    feeds = [h[:f] for h, f in zip(hist, fed)]
    for _ in range(n + 1):
        due = [f == len(h) for f, h in zip(fed, hist)]
        toks = step(list(range(len(samplers))), feeds, [s if d else None for s, d in zip(samplers, due)],
                    [h if d else None for h, d in zip(hist, due)])
        feeds = []
        for i, (tok, d) in enumerate(zip(toks, due)):
            if d:
                hist[i].append(tok)
                out[i].append(tok)
            else:
                assert tok is None
            feeds.append(hist[i][fed[i]:])
            fed[i] = len(hist[i])
    return [o[:n] for o in out]


@pytest.mark.parametrize("shape", ["pp2", "tp2"])
def test_last_stage_sampling_matches_in_process_sampler(shape, tiny_gguf, ray_cluster):
    """step_sampled: the last stage samples with every option model/sampling.py supports and returns token ids;
    tokens and the driver's generator states equal sampling the in-process engine's logits here."""
    from ollama_distributed.model.options import GenerationOptions
    from ollama_distributed.model.sampling import Sampler

    def samplers():
        return [Sampler(GenerationOptions.from_dict(o), 256) for o in SAMPLING]

    ref = LocalExecutor(tiny_gguf, max_seq_len=256)

    def local_step(ids, feeds, ss, hists):
        logits = ref.step(ids, feeds)
        return [None if s is None else s.sample(logits[i], h) for i, (s, h) in enumerate(zip(ss, hists))]

    want_samplers, got_samplers = samplers(), samplers()
    want = sampled_run(local_step, want_samplers, 8)
    ref.close()
    cfg = read_config(tiny_gguf)
    ex = RayExecutor(uniform_plan(cfg, SHAPES[shape], "tiny"), tiny_gguf, ray_cluster, max_seq_len=256)
    try:
        got = sampled_run(ex.step_sampled, got_samplers, 8)
        assert got == want
        for a, b in zip(got_samplers, want_samplers):  # the driver's samplers stayed in step with the shard's
            assert torch.equal(a.generator.get_state(), b.generator.get_state())
        for i in range(len(SAMPLING)):
            ex.free(i)
        assert ex.cached_sequences() == set()
    finally:
        ex.close()


def test_last_stage_applies_grammar_and_returns_logprobs(tiny_gguf, ray_cluster):
    """A grammar constraint and logprobs run on the last stage too: the tokens, their logprobs and the constraint's
    state equal sampling the in-process logits here (the driver's constraint copy follows the shard's)."""
    from ollama_distributed.model.options import GenerationOptions
    from ollama_distributed.model.sampling import Sampler
    from ollama_distributed.model.tokenizer import Tokenizer
    from ollama_distributed.service.grammar.constraint import GrammarConstraint
    from ollama_distributed.service.grammar.schema import compile_format

    tok = Tokenizer.from_gguf(tiny_gguf)
    grammar = compile_format({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})

    def samplers():
        return [Sampler(GenerationOptions.from_dict({"temperature": 0}), 256,
                        constraint=GrammarConstraint(grammar, tok, 12), top_logprobs=3),
                Sampler(GenerationOptions.from_dict({"temperature": 0.8, "top_k": 40, "seed": 7}), 256,
                        top_logprobs=0)]

    ref = LocalExecutor(tiny_gguf, max_seq_len=256)
    want_lp: list[list] = [[], []]
    got_lp: list[list] = [[], []]

    def local_step(ids, feeds, ss, hists):
        logits = ref.step(ids, feeds)
        toks = [None if s is None else s.sample(logits[i], h) for i, (s, h) in enumerate(zip(ss, hists))]
        for i, s in enumerate(ss):
            if s is not None:
                want_lp[i].append(s.last_logprobs)
        return toks

    want_samplers, got_samplers = samplers(), samplers()
    want = sampled_run(local_step, want_samplers, 10)
    ref.close()
    cfg = read_config(tiny_gguf)
    ex = RayExecutor(uniform_plan(cfg, SHAPES["pp2"], "tiny"), tiny_gguf, ray_cluster, max_seq_len=256)
    try:
        def remote_step(ids, feeds, ss, hists):
            toks = ex.step_sampled(ids, feeds, ss, hists)
            for i, s in enumerate(ss):
                if s is not None:
                    got_lp[i].append(s.last_logprobs)
            return toks

        got = sampled_run(remote_step, got_samplers, 10)
    finally:
        ex.close()
    assert got == want
    assert got_samplers[0].constraint.consumed == want_samplers[0].constraint.consumed
    for a, b in zip(got_lp, want_lp):
        assert len(a) == len(b) and all(x is not None for x in a)
        for x, y in zip(a, b):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_bad_plans_fail_before_starting(tiny_gguf, ray_cluster):
    cfg = read_config(tiny_gguf)
    plan = uniform_plan(cfg, [["node1"], ["nowhere"]], "tiny")
    with pytest.raises(KeyError, match="nowhere"):
        RayExecutor(plan, tiny_gguf, ray_cluster)
    plan = uniform_plan(cfg, [["node1"], ["node2"]], "tiny")
    plan["stages"][1]["layers"] = [3, 4]
    with pytest.raises(PlacementError, match="starting at 2"):
        RayExecutor(plan, tiny_gguf, ray_cluster)
    plan = uniform_plan(cfg, [["node1"]], "tiny")
    plan["stages"][0]["shards"][0]["memory_bytes"] = 64 * 2**30
    with pytest.raises(PlacementError, match="budget"):
        RayExecutor(plan, tiny_gguf, ray_cluster)


def test_close_leaves_no_actor_processes(tiny_gguf, ray_cluster):
    cfg = read_config(tiny_gguf)
    ex = RayExecutor(uniform_plan(cfg, [["node1"], ["node2"]], "tiny"), tiny_gguf, ray_cluster, max_seq_len=64)
    pids = [s["pid"] for s in ex.shard_info()]
    assert all(psutil.pid_exists(p) for p in pids)
    ex.close()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "shard processes survived close()"
    with pytest.raises(RuntimeError, match="closed"):
        ex.step([0], [[1]])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_killed_node_surfaces_as_executor_error(tiny_gguf, ray_cluster):
    """A node failing mid-plan (its raylet and workers killed) ends the next step with an error naming it."""
    cfg = read_config(tiny_gguf)
    ray_cluster.add_local_node("doomed", "1GiB")
    ex = RayExecutor(uniform_plan(cfg, [["node1"], ["doomed"]], "tiny"), tiny_gguf, ray_cluster, max_seq_len=64,
                     timeout_s=60)
    try:
        ex.step([0], [[1, 2, 3]])
        ray_cluster.kill_node("doomed")
        ray_cluster.wait_for_nodes(4, timeout=15)  # the GCS notices within its health-check window
        with pytest.raises(ExecutorError, match="doomed"):
            ex.step([0], [[4]])
        with pytest.raises(ExecutorError, match="broken"):
            ex.step([0], [[4]])
    finally:
        ex.close()


# ---- the real model -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_ref(smollm2_path):
    ex = LocalExecutor(smollm2_path, max_seq_len=256)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def smol_pp2(smollm2_path, ray_cluster):
    cfg = read_config(smollm2_path)
    # micro_batches=2: batches are split so the two stages overlap (the default on one machine is 1, see
    # RayExecutor), which exercises the isend/recv interleaving of the pipeline.
    ex = RayExecutor(uniform_plan(cfg, [["node1"], ["node2"]], "smollm2"), smollm2_path, ray_cluster, max_seq_len=256,
                     micro_batches=2)
    yield ex
    ex.close()


def test_smollm2_pipeline_matches_and_fits_memory(smollm2_path, smol_ref, smol_pp2, ray_cluster):
    check_placement(smol_pp2, ray_cluster)
    toks, logits = greedy(smol_pp2, 0, PROMPTS[2], 8)
    ref_toks, ref_logits = greedy(smol_ref, 0, PROMPTS[2], 8)
    assert toks == ref_toks
    for a, b in zip(logits, ref_logits):
        assert_close(a, b)
    # Resident memory per shard: anonymous RSS grown since before loading (torch and the code were already
    # imported) vs the shard's weights (computed from the model's shapes, not reported by the shard) + KV cache.
    cfg = read_config(smollm2_path)
    smol_pp2.step([7], [PROMPTS[2]])
    for info, p in zip(smol_pp2.shard_info(), [s for row in smol_pp2.stages for s in row]):
        weights = shard_weight_bytes(cfg, p.spec)
        assert info["weight_bytes"] == weights
        grown = info["rss_anon"] - info["rss_anon_baseline"]
        share = weights + info["cache_bytes"]
        assert grown <= 1.3 * share, f"{p.node}: RSS grew {grown / 2**20:.0f} MiB for {share / 2**20:.0f} MiB of weights+KV"
        assert grown >= 0.9 * weights, f"{p.node}: RSS grew only {grown / 2**20:.0f} MiB — weights not resident?"
    smol_pp2.free(7)
    # embeddings through the pipeline equal the single-process ones
    assert_close(smol_pp2.embed(PROMPTS[0]), smol_ref.embed(PROMPTS[0]), 1e-5)


def test_smollm2_eight_concurrent_sequences_through_pipeline(smol_pp2):
    prompts = [[1 + 13 * i + j for j in range(3 + i)] for i in range(8)]
    alone = [greedy(smol_pp2, 100 + i, p, 5)[0] for i, p in enumerate(prompts)]
    ids = list(range(200, 208))
    logits = smol_pp2.step(ids, prompts)  # ragged prefill of all 8 in one step, split into micro-batches
    together = [[] for _ in ids]
    for _ in range(5):
        toks = [int(r.argmax()) for r in logits]
        for out, t in zip(together, toks):
            out.append(t)
        logits = smol_pp2.step(ids, [[t] for t in toks])
    assert together == alone
    for sid in ids[:4]:  # cancel half: their KV cache goes on every shard, the rest keep going
        smol_pp2.free(sid)
    assert smol_pp2.cached_sequences() == set(ids[4:])
    for sid in ids[4:]:
        smol_pp2.free(sid)


@pytest.mark.parametrize("shape", ["tp2", "hybrid2x2"])
def test_smollm2_tensor_parallel_matches(shape, smollm2_path, smol_ref, ray_cluster):
    cfg = read_config(smollm2_path)
    ex = RayExecutor(uniform_plan(cfg, SHAPES[shape], "smollm2"), smollm2_path, ray_cluster, max_seq_len=256)
    try:
        check_placement(ex, ray_cluster)
        toks, logits = greedy(ex, 0, PROMPTS[0], 6)
        ref_toks, ref_logits = greedy(smol_ref, 0, PROMPTS[0], 6)
        assert toks == ref_toks
        for a, b in zip(logits, ref_logits):
            assert_close(a, b)
    finally:
        ex.close()


def _same_plan_in_process(path, cluster, shape: str, name: str, quant: str, check=None) -> list[list]:
    """The Ray run of `shape`'s plan over `path` gives the greedy tokens and logits (1e-3) of the same plan's shards
    run in this process with the same weight format; check(ex, local), where given, inspects both first. Returns
    the in-process shards (per stage)."""
    cfg = read_config(path)
    plan = uniform_plan(cfg, SHAPES[shape], name)
    specs = [[spec for _, spec, _ in row] for row in shard_specs(plan, cfg)]  # the plan's shards, in process
    local = LocalExecutor.from_plan(path, specs, max_seq_len=256, quant=quant)
    ex = RayExecutor(plan, path, cluster, max_seq_len=256, quant=quant)
    try:
        if check is not None:
            check(ex, local)
        for i, p in enumerate(PROMPTS[:2]):
            toks, logits = greedy(ex, i, p, 6)
            ref_toks, ref_logits = greedy(local, i, p, 6)
            assert toks == ref_toks
            for a, b in zip(logits, ref_logits):
                assert_close(a, b, tol=1e-3)
        return local.stages
    finally:
        ex.close()
        local.close()


@pytest.mark.parametrize("shape", ["pp2", "tp2"])
def test_int4_shards_on_ray_match_in_process_int4(shape, tiny_gguf_factory, ray_cluster):
    """Workers load int4 shards (model/quant.py) from a Q4_1 file: the Ray run of a plan gives the tokens and
    logits of the same plan's shards run in this process (same bf16 arithmetic, so equal to float rounding)."""

    def same_bytes(ex, local) -> None:  # each worker holds its int4 shard: the bytes of the in-process shard
        assert sorted(i["weight_bytes"] for i in ex.shard_info()) == sorted(
            sh.weight_bytes() for stage in local.stages for sh in stage)

    _same_plan_in_process(tiny_gguf_factory(dtype="q4_1"), ray_cluster, shape, "tiny-q4", "int4", same_bytes)


@pytest.mark.parametrize("shape", ["tp2", "hybrid2x2"])
def test_native_shards_on_ray_match_in_process(shape, tiny_gguf_factory, ray_cluster):
    """`--dtype auto` shards of a head_dim-32 Q8_0 file decode through the fused step (model/fused_decode.py), whose
    tensor-parallel all-reduce is the worker's collective called back from C++: the Ray run equals the same plan's
    shards in this process."""
    path = tiny_gguf_factory(vocab=1024, hidden=256, n_heads=8, n_kv_heads=2, ffn=512, dtype="q8_0")
    stages = _same_plan_in_process(path, ray_cluster, shape, "tiny-q8", "native")
    assert all(sh._decode_plan for stage in stages for sh in stage)
