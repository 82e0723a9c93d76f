"""Memory follows the file (`--dtype auto`): the profile counts each tensor's real bytes from the GGUF header, the
KV cache in its cache type, and tensor-parallel splits fall on the quantisation-block grid."""

import gguf
import pytest
from typer.testing import CliRunner

from ollama_distributed.cli import app
from ollama_distributed.model import formats
from ollama_distributed.model.config import ModelConfig
from ollama_distributed.scheduler import ModelProfile, PlanConfig, Workload, plan
from ollama_distributed.scheduler.cost import CostModel
from ollama_distributed.scheduler.profile import TensorBytes, preset_profile
from ollama_distributed.scheduler.strategies.tensor import Grid, split_group
from tests.scheduler.helpers import GB, cluster, node
from tests.scheduler.test_plan_cli import EXAMPLE

ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
FFN = ("ffn_gate", "ffn_up", "ffn_down")


def _cfg(path) -> ModelConfig:
    from ollama_distributed.cli.plan_cmd import config_from_gguf

    return config_from_gguf(path)


def _real_bytes(path) -> dict[str, int]:
    """Each tensor's bytes in the file, as gguf-py's own reader counts them."""
    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("dtype,kw", [
    ("q4_0", {}), ("q8_0", {}), ("f16", {}), ("q4_0", {"tied": True}), ("q8_0", {"arch": "qwen2"}),
    ("q4_k", {"hidden": 256, "n_heads": 4, "n_kv_heads": 2, "ffn": 512}),
])
def test_profile_bytes_are_the_tensors_real_bytes(tiny_gguf_factory, dtype, kw):
    path = tiny_gguf_factory(dtype=dtype, vocab=512, **kw)
    cfg, real = _cfg(path), _real_bytes(path)
    prof = ModelProfile.from_config(cfg, "auto", tensor_bytes=TensorBytes.from_tensors(
        cfg, formats.read_gguf_tensors(path)))
    L, A, F = cfg.n_layers, cfg.n_kv_heads, cfg.ffn_size
    attn = sum(real[f"blk.{i}.{n}.{w}"] for i in range(L) for n in ATTN for w in ("weight", "bias")
               if f"blk.{i}.{n}.{w}" in real)
    ffn = sum(real[f"blk.{i}.{n}.weight"] for i in range(L) for n in FFN)
    norms = sum(real[f"blk.{i}.{n}.weight"] for i in range(L) for n in ("attn_norm", "ffn_norm"))
    assert prof.attn_unit_bytes * A * L == attn
    assert prof.ffn_unit_bytes * F * L == ffn
    assert prof.layer_norm_bytes * L == norms
    assert prof.embedding_bytes == real["token_embd.weight"]
    assert prof.total_weight_bytes == sum(real.values())  # every tensor once (a tied head is the embedding)
    head = real["token_embd.weight"] if cfg.tie_embeddings else real["output.weight"]
    assert prof.head_bytes == head + real["output_norm.weight"]
    block = formats.block_size(dtype)
    assert (prof.ffn_block, prof.attn_block) == (block, block)
    assert prof.kv_bytes == 2 and prof.act_bytes == 4  # f16 cache (Ollama's default), float32 stream


def test_mixed_types_per_layer_are_averaged():
    """A Q4_K_M-like header: q/k/o/gate/up Q4_K, v and down Q6_K in layer 0 only (llama.cpp's use_more_bits),
    F32 norms; hidden 256, 2 layers, 4 heads / 2 KV heads (d 64), FFN 512, vocab 1000, untied."""
    cfg = ModelConfig(arch="llama", n_layers=2, hidden_size=256, n_heads=4, n_kv_heads=2, ffn_size=512,
                      vocab_size=1000, context_length=512)
    T = formats.GGUFTensor
    tensors = {"token_embd.weight": T("token_embd.weight", "Q4_K", (256, 1000)),
               "output.weight": T("output.weight", "Q6_K", (256, 1000)),
               "output_norm.weight": T("output_norm.weight", "F32", (256,))}
    for i in range(2):
        more = "Q6_K" if i == 0 else "Q4_K"
        for n, typ, shape in (("attn_q", "Q4_K", (256, 256)), ("attn_k", "Q4_K", (256, 128)),
                              ("attn_v", more, (256, 128)), ("attn_output", "Q4_K", (256, 256)),
                              ("ffn_gate", "Q4_K", (256, 512)), ("ffn_up", "Q4_K", (256, 512)),
                              ("ffn_down", more, (512, 256)), ("attn_norm", "F32", (256,)),
                              ("ffn_norm", "F32", (256,))):
            tensors[f"blk.{i}.{n}.weight"] = T(f"blk.{i}.{n}.weight", typ, shape)
    t = TensorBytes.from_tensors(cfg, tensors)
    q4k, q6k = 144 / 256, 210 / 256
    attn_l0 = (256 * 256 + 256 * 128 + 256 * 256) * q4k + 256 * 128 * q6k
    attn_l1 = (256 * 256 + 2 * 256 * 128 + 256 * 256) * q4k
    assert t.attn_unit == (attn_l0 + attn_l1) / (2 * 2)  # the per-layer average of one KV group
    ffn_l0, ffn_l1 = 2 * 256 * 512 * q4k + 256 * 512 * q6k, 3 * 256 * 512 * q4k
    assert t.ffn_unit == (ffn_l0 + ffn_l1) / (2 * 512)
    assert (t.layer_norms, t.final_norm) == (2 * 256 * 4, 256 * 4)
    assert (t.embedding, t.head) == (256 * 1000 * q4k, 256 * 1000 * q6k)
    assert (t.ffn_block, t.attn_block) == (256, 256)
    prof = ModelProfile.from_config(cfg, "auto", tensor_bytes=t)
    assert prof.total_weight_bytes == sum(x.nbytes for x in tensors.values())
    assert prof.kv_step == 2  # a KV group owns g·d = 128 of attn_output's inputs: half a Q4_K block


def test_missing_tensor_is_named():
    cfg = ModelConfig(arch="llama", n_layers=1, hidden_size=64, n_heads=2, n_kv_heads=1, ffn_size=64,
                      vocab_size=10, context_length=64)
    with pytest.raises(ValueError, match="lacks tensor 'blk.0.attn_q.weight'"):
        TensorBytes.from_tensors(cfg, {})


def test_auto_without_a_table_is_refused_and_float_formats_ignore_the_file():
    with pytest.raises(ValueError, match="pass tensor_bytes"):
        ModelProfile.from_config(_preset_cfg("smollm2-135m"), "auto")
    with pytest.raises(ValueError, match="applies to 'auto' only"):
        ModelProfile.from_config(_preset_cfg("smollm2-135m"), "float32",
                                 tensor_bytes=TensorBytes.q4_k_m(_preset_cfg("smollm2-135m")))
    assert preset_profile("smollm2-135m", "float32").tensor_bytes is None


def _preset_cfg(name: str) -> ModelConfig:
    from ollama_distributed.scheduler.profile import PRESETS

    return PRESETS[name]


@pytest.mark.parametrize("dtype,setting,kv", [
    ("auto", None, 2.0), ("auto", "q8_0", 34 / 32), ("auto", "f32", 4.0), ("float32", None, 4.0),
    ("float32", "f16", 2.0), ("bfloat16", None, 2.0), ("float16", None, 2.0), ("int4", None, 4.0),
    ("f16", None, 2.0), ("f32", None, 4.0),
])
def test_kv_cache_bytes_follow_the_cache_type(dtype, setting, kv):
    prof = preset_profile("llama3-8b", dtype, setting)
    assert prof.kv_bytes == kv
    assert prof.kv_bytes_per_token_per_layer == 8 * 2 * 128 * kv


def test_preset_auto_counts_q4_k_m():
    """A preset has no file: `auto` counts it as Q4_K_M at llama.cpp's 4.84 bits per weight, so Llama-2-70B needs
    ~42 GB (Ollama lists llama2:70b at 39 GiB = 41.9 GB) and Llama-2-7B 4.08 GB (TheBloke's Q4_K_M file: 4.08 GB)."""
    p70 = preset_profile("llama-70b", "auto")
    assert p70.total_weight_bytes == pytest.approx(p70.total_params * 4.844 / 8, rel=1e-3)
    assert 40e9 < p70.total_weight_bytes < 43e9
    assert preset_profile("llama-7b", "auto").total_weight_bytes == pytest.approx(4.08e9, rel=0.01)
    assert (p70.ffn_block, p70.attn_block, p70.kv_step, p70.ffn_step) == (256, 256, 1, 256)
    # llama-7b: MHA, g·d = 128 of a 256-input Q4_K block per KV group
    assert preset_profile("llama-7b", "auto").kv_step == 2
    # qwen2-72b's FFN of 29568 is not a whole number of 256-blocks: llama.cpp's 32-input fallback
    assert preset_profile("qwen2-72b", "auto").ffn_block == 32


def test_plan_cli_llama_70b_needs_about_40_gb():
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "--model", "llama-70b", "--cluster", str(EXAMPLE)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "41.8 GB of weights (auto)" in res.stdout
    res = runner.invoke(app, ["plan", "--model", "llama-70b", "--cluster", str(EXAMPLE), "--dtype", "float16"])
    assert res.exit_code == 1 and "needs 138.2 GB" in res.stderr
    res = runner.invoke(app, ["plan", "--model", "llama-70b", "--cluster", str(EXAMPLE), "--json",
                              "--kv-cache-type", "q8_0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["plan", "--model", "llama-70b", "--cluster", str(EXAMPLE)],
                        env={"OLLAMA_KV_CACHE_TYPE": "q4_0"})
    assert res.exit_code == 1 and "expected f32|f16|q8_0" in res.stderr


def test_plan_cli_reads_a_gguf_file(tiny_gguf_factory):
    path = tiny_gguf_factory(dtype="q8_0", vocab=512)
    res = CliRunner().invoke(app, ["plan", "--model", str(path), "--cluster", str(EXAMPLE), "--strategy", "tensor",
                                   "--json"])
    assert res.exit_code == 0, res.output
    import json

    d = json.loads(res.stdout)
    cuts = [s["ffn"][0] for s in d["stages"][0]["shards"]]
    assert all(c % 32 == 0 for c in cuts)  # Q8_0 ffn_down: cuts on its 32-input blocks


# --- tensor-parallel splits on the block grid --------------------------------------------------------------------

def _grid_profile(ffn_block: int = 1, attn_block: int = 1, kv: int = 4, head_dim: int = 64) -> ModelProfile:
    return ModelProfile("grid", 4, 256, kv, kv, head_dim, 256, 1000, context_length=4096, weight_bytes=2.0,
                        kv_bytes=2.0, act_bytes=2.0, ffn_block=ffn_block, attn_block=attn_block)


def _two_speeds():
    # a fast and a 3x slower node, plenty of memory, a fast link: the unit optimum is a 3:1 split
    return cluster(node("fast", 100 * GB, bw=300e9, flops=30e12), node("slow", 100 * GB, bw=100e9, flops=10e12),
                   bandwidth=100e9, latency=1e-6)


def test_ffn_split_on_the_block_grid_stays_uneven():
    wl = Workload(prompt_tokens=16, output_tokens=16)
    free = plan(_grid_profile(), _two_speeds(), wl, PlanConfig(strategy="tensor"))
    assert [sh.ffn for sh in free.stages[0].shards] == [(0, 192), (192, 256)]
    blocked = plan(_grid_profile(ffn_block=32), _two_speeds(), wl, PlanConfig(strategy="tensor"))
    ffn = [sh.ffn for sh in blocked.stages[0].shards]
    assert all(a % 32 == 0 and b % 32 == 0 for a, b in ffn) and ffn == [(0, 192), (192, 256)]
    assert "splits on quantisation blocks" in blocked.reason
    K = _grid_profile(ffn_block=256)  # one block: no 2-way split on the grid, so the fallback cuts per column
    fb = plan(K, _two_speeds(), wl, PlanConfig(strategy="tensor"))
    assert "off it" in fb.reason and len(fb.stages[0].shards) == 2


def test_ffn_split_snaps_where_the_unit_optimum_is_off_grid():
    """At 2:1 speeds the per-column optimum of 256 columns is 171/85; on 64-column units it is 192/64."""
    c = cluster(node("fast", 100 * GB, bw=200e9, flops=20e12), node("slow", 100 * GB, bw=100e9, flops=10e12),
                bandwidth=100e9, latency=1e-6)
    cm = CostModel(_grid_profile(ffn_block=64), c, Workload(prompt_tokens=16, output_tokens=16))
    free = split_group(cm, ["fast", "slow"], 4, True, True)
    assert free is not None and free.ffn == (171, 85)
    on_grid = split_group(cm, ["fast", "slow"], 4, True, True, Grid(1, 64))
    assert on_grid is not None and on_grid.ffn == (192, 64) and on_grid.kv == free.kv


def test_kv_groups_split_in_whole_blocks_of_attn_output():
    """8 MHA heads of d 128 with a Q4_K o-projection: a KV group is half a block, so KV groups go in pairs."""
    prof = _grid_profile(attn_block=256, kv=8, head_dim=128)
    assert prof.kv_step == 2
    p = plan(prof, _two_speeds(), Workload(prompt_tokens=16, output_tokens=16), PlanConfig(strategy="tensor"))
    kv = [sh.kv_heads for sh in p.stages[0].shards]
    assert all(a % 2 == 0 and b % 2 == 0 for a, b in kv) and kv[-1][1] == 8


def test_off_grid_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of ffn_block"):
        _grid_profile(ffn_block=96)
    with pytest.raises(ValueError, match="not a whole number of 512-input blocks"):
        _grid_profile(attn_block=512, kv=2, head_dim=64)  # 128 inputs
