"""Gemma 3, Gemma 2, Qwen 3 and Phi-3 (tiny random GGUFs written as llama.cpp's converters write them) vs
transformers loading the same file, and their pipeline / tensor-parallel shards vs the unsharded engine; the same
weights as HF directories; gemma3's ring KV cache vs a cache of every position.

gemma3's tiny model has 6 layers (5 sliding over a window of 8, RoPE base 10000; 1 global, base 1e6), so prompts and
greedy continuations longer than 8 tokens exercise the window on every attention path (prefill, chunk after a cached
prefix, one sequence decoding, batched decode).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ollama_distributed.model.config import SUPPORTED_ARCHITECTURES
from ollama_distributed.model.tp_local import LocalPipeline, LocalStage, make_plan
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.model.weights import load_weights, read_config
from tests.helpers.tiny_gguf import FAMILIES, write_tiny_family_gguf
from tests.model.test_sharded import check_plan, pipeline_outputs, plans, reference_outputs
from tests.model.test_transformer import (
    hf_greedy,
    hf_logits,
    ours_greedy_batched,
    ours_prefill_all,
    rel_err,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
GREEDY = 32


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 5, 13, 27)]


def hf_load(path):
    """transformers' float32 model of the file; gemma2 with eager attention (the implementation that soft-caps)."""
    from transformers import AutoModelForCausalLM

    eager = {"attn_implementation": "eager"} if path.stem == "gemma2" else {}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **eager)
    return model.eval()


@pytest.fixture(scope="module")
def family_gguf(tmp_path_factory):
    """`make(arch, **kw) -> Path`, one file per distinct arguments, alone in its directory (transformers' loader)."""
    cache = {}

    def make(arch: str, **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = write_tiny_family_gguf(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch, **kw)
        return cache[key]

    return make


@pytest.mark.parametrize("arch", FAMILIES)
def test_config_from_metadata(family_gguf, arch):
    cfg = read_config(family_gguf(arch))
    assert cfg.arch == arch and arch in SUPPORTED_ARCHITECTURES
    assert cfg.qk_norm == (arch in ("gemma3", "qwen3")) and not cfg.attention_bias
    if arch == "gemma3":
        assert cfg.tie_embeddings and cfg.post_norms and cfg.activation == "gelu_tanh"
        assert cfg.sliding_window == 8 and cfg.sliding_window_pattern == 6
        assert [cfg.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
        assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
        assert cfg.embed_scale == pytest.approx(96 ** 0.5) and cfg.attention_scale == 256 ** -0.5
        assert [cfg.kv_positions(i, 100) for i in (0, 5)] == [8, 100]
    if arch == "gemma2":
        assert (cfg.attn_softcap, cfg.final_softcap, cfg.sliding_window_pattern) == (50.0, 30.0, 2)
        assert [cfg.is_sliding(i) for i in range(4)] == [True, False, True, False]
        assert cfg.rope_local_theta == cfg.rope_theta == 1e4 and cfg.post_norms and not cfg.qk_norm


@pytest.mark.parametrize("arch", FAMILIES)
def test_logits_and_greedy_match_transformers(family_gguf, arch):
    path = family_gguf(arch)
    ours, ref = ModelShard.from_file(path), hf_load(path)
    ps = prompts(ours.cfg.vocab_size)
    for prompt, got in zip(ps, ours_prefill_all(ours, ps)):
        assert rel_err(got, hf_logits(ref, prompt)) <= 1e-4
    # batched greedy: 4 sequences decoding together (the batched decode path, with the window mask for gemma3)
    for prompt, tokens in zip(ps, ours_greedy_batched(ours, ps, GREEDY)):
        assert tokens == hf_greedy(ref, prompt, GREEDY)


def test_gemma3_one_sequence_decode_and_chunked_prefill(family_gguf):
    """The one-sequence decode path (fused kernels where they fit; the window taken by torch's) and a prompt fed
    in chunks after a cached prefix, both past the window, vs transformers' full-prompt logits."""
    path = family_gguf("gemma3")
    ours, ref = ModelShard.from_file(path), hf_load(path)
    prompt = prompts(ours.cfg.vocab_size)[3]
    cache = ours.new_cache(256)
    got = [ours.forward(torch.tensor(prompt[:11]), [0], [11], cache, output="all_logits")]
    got.append(ours.forward(torch.tensor(prompt[11:20]), [0], [9], cache, output="all_logits"))
    got += [ours.forward(torch.tensor([t]), [0], [1], cache, output="all_logits") for t in prompt[20:]]
    assert rel_err(torch.cat(got), hf_logits(ref, prompt)) <= 1e-4


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("name", ["pp2", "tp2-uneven", "pp2xtp2"])
def test_sharded_equals_unsharded(family_gguf, arch, name):
    path = family_gguf(arch)
    cfg = read_config(path)
    reference = reference_outputs(ModelShard.from_file(path))
    check_plan(plans(cfg)[name], lambda spec: ModelShard(cfg, spec, load_weights(path, cfg, spec)), reference,
               cfg.vocab_size)


@pytest.mark.parametrize("arch", FAMILIES)
def test_native_quantised_weights(family_gguf, arch):
    """`--dtype auto` on a Q8_0 file of each family: the file's blocks through our kernels vs transformers'
    dequantised float32 (bounds of tests/model/test_file_format.py: activations quantised inside the kernels),
    and a TP-2 split of it vs the unsharded native engine."""
    path = family_gguf(arch, dtype="q8_0")
    ref = hf_load(path)
    ours = ModelShard.from_file(path, quant="native", kv_dtype=torch.float32)
    assert ours.quant == "native"
    ps = prompts(ours.cfg.vocab_size)
    for prompt, got in zip(ps, ours_prefill_all(ours, ps)):
        assert rel_err(got, hf_logits(ref, prompt)) <= 1e-3
    cfg = ours.cfg  # TP-2: KV groups 2 + 1, FFN columns on the 32-input block grid
    plan = make_plan(cfg, [(0, cfg.n_layers)], [(0, 2), (2, 3)], [(0, 64), (64, cfg.ffn_size)])
    pipe = LocalPipeline([LocalStage([ModelShard(cfg, spec, load_weights(path, cfg, spec, quant="native"),
                                                 kv_dtype=torch.float32) for spec in stage]) for stage in plan])
    try:
        got = pipeline_outputs(pipe, cfg.vocab_size)
    finally:
        pipe.close()
    # 2e-4: the row-parallel partials sum in another order and our kernels quantise activations, as
    # tests/model/test_file_format.py::test_sharded_native_equals_unsharded explains
    for step, (a, b) in enumerate(zip(got, reference_outputs(ours))):
        assert rel_err(a, b) <= 2e-4, f"step {step}"


@pytest.mark.parametrize("arch", FAMILIES)
def test_int4_runs_close_to_float(family_gguf, arch):
    path = family_gguf(arch)
    exact, q4 = ModelShard.from_file(path), ModelShard.from_file(path, quant="int4")
    ps = prompts(exact.cfg.vocab_size)
    for a, b in zip(ours_prefill_all(q4, ps), ours_prefill_all(exact, ps)):
        # 4-bit groups of random N(0, 0.08²) weights: the tiny llama of the same shape is off by 0.14-0.20
        # relative too; a family's layer done wrong (a norm or a RoPE base missed) is off by ~1
        assert rel_err(a, b) <= 0.35


@pytest.mark.parametrize("kv", ["f32", "f16", "q8_0"])
def test_gemma3_ring_cache_equals_full_cache(family_gguf, kv):
    """Sliding layers keeping a ring of their window (ModelShard.new_cache) compute what a cache of every
    position with the window applied by masks computes, over the ragged scenario of test_sharded (prefill, chunks
    after a cached prefix, mixed and batched decode, a freed slot reused), for each KV cache type; the ring starts
    smaller than the window and grows into it. And the ring layers hold only the window."""
    from ollama_distributed.model.kv_cache import KVCache
    from ollama_distributed.model.quant import kv_cache_dtype
    from tests.model.test_sharded import run_scenario

    path = family_gguf("gemma3")
    shard = ModelShard.from_file(path, kv_dtype=kv_cache_dtype("float32", kv))
    cfg, n_kv, hd = shard.cfg, shard.n_kv, shard.cfg.head_dim

    def outputs(cache):
        return run_scenario(lambda x, s, c, o: shard.forward(x, s, c, cache, output=o), cache.free, cfg.vocab_size)

    rings = tuple(cfg.is_sliding(i) for i in range(cfg.n_layers))
    ring = KVCache(cfg.n_layers, n_kv, hd, 128, shard.kv_dtype, initial_capacity=4, ring_layers=rings,
                   window=cfg.sliding_window)
    full = KVCache(cfg.n_layers, n_kv, hd, 128, shard.kv_dtype, initial_capacity=4)
    assert ring.is_ring(0) and not ring.is_ring(5) and not full.is_ring(0)
    bound = {"f32": 1e-5, "f16": 1e-3, "q8_0": 1e-2}[kv]  # (only the order of summation differs for f32)
    for step, (a, b) in enumerate(zip(outputs(ring), outputs(full))):
        assert rel_err(a, b) <= bound, f"step {step}"
    assert ring.layer(0)[0].shape[2] == cfg.sliding_window and full.layer(0)[0].shape[2] > cfg.sliding_window
    cap, w = full.capacity, cfg.sliding_window  # 1 global layer of `cap` positions and 5 rings of `w`
    assert ring.nbytes() * cfg.n_layers * cap == full.nbytes() * (cap + 5 * w) and w < cap


def test_gemma3_without_a_template_gets_gemmas_turn_format():
    """Gemma 3 GGUFs may ship no `tokenizer.chat_template` (the 270M one does not); the family's turn format is
    used then (a system message folded into the first user turn, as Gemma's own template does), a file's own
    template otherwise, and ChatML for other families."""
    from ollama_distributed.model.chat_template import ChatTemplate

    meta = {"general.architecture": "gemma3", "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>"],
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]
    assert ChatTemplate.from_metadata(meta).render(msgs) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")
    own = ChatTemplate.from_metadata({**meta, "tokenizer.chat_template": "{{ messages[0]['content'] }}"})
    assert own.render(msgs) == "Be brief."
    assert ChatTemplate.from_metadata({**meta, "general.architecture": "qwen3"}).is_fallback


@pytest.mark.parametrize("arch", FAMILIES)
def test_hf_directory_equals_gguf(family_gguf, tmp_path, arch):
    """The same weights as an HF directory (transformers' own save of the model its GGUF loader built: HF names,
    fused phi3 tensors, gemma's norms stored as w rather than 1 + w) load to the same config and logits, and a
    pipeline x tensor-parallel split of the directory equals the unsharded engine."""
    path = family_gguf(arch)
    ref = hf_load(path)
    config = ref.config
    if hasattr(config, "quantization_config"):  # (the GGUF loader marks it; a plain save needs it gone)
        del config.quantization_config
    fresh = type(ref)(config)
    fresh.load_state_dict(ref.state_dict())
    fresh.save_pretrained(tmp_path / "hf")
    from_gguf, from_dir = ModelShard.from_file(path), ModelShard.from_file(tmp_path / "hf")
    assert replace(from_dir.cfg, name="") == replace(from_gguf.cfg, name="")
    ps = prompts(from_gguf.cfg.vocab_size)
    for a, b in zip(ours_prefill_all(from_dir, ps), ours_prefill_all(from_gguf, ps)):
        assert rel_err(a, b) <= 1e-6
    cfg, d = from_dir.cfg, tmp_path / "hf"
    check_plan(plans(cfg)["pp2xtp2"], lambda spec: ModelShard(cfg, spec, load_weights(d, cfg, spec)),
               reference_outputs(from_gguf), cfg.vocab_size)
