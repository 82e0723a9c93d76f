"""The fused decode step (model/fused_decode.py, kernels/cpu_kernels.cpp DecodePlan) against the op-by-op path.

Both run the same kernels in the same order; they differ only in SiLU's last bits (our vectorised exp vs torch's),
which the activations' int8 quantisation in the next matmul can turn into a one-step change of an input's code
(2^-15 of its group's largest). So logits agree to ~1e-5 relative, 1.3e-4 at most seen (bound 3e-4, against
~1e-3 between either path and transformers' float32, tests/model/test_file_format.py), and greedy tokens are
equal. Covered: every native type, float16
and float32 caches, ragged batches of decode sequences (and a step with a subset of them), q/k/v of mixed types
(file_format.Stacked), qwen2's q/k/v bias, qwen3's q/k norms, tensor- and pipeline-parallel shards; and where the
plan does not apply (q8_0 cache, head_dim 16, turned off), the op-by-op path runs.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ollama_distributed.model import cpu_kernels
from ollama_distributed.model.file_format import GGUFRows, Stacked
from ollama_distributed.model.native import NATIVE_TYPES, NativeMatrix
from ollama_distributed.model.quant import KV_DTYPES
from ollama_distributed.model.shard import ShardSpec
from ollama_distributed.model.tp_local import LocalPipeline, LocalStage, make_plan
from ollama_distributed.model.transformer import ModelShard
from ollama_distributed.model.weights import load_weights, read_config
from tests.helpers.tiny_gguf import write_tiny_family_gguf

SHAPE = {"vocab": 1024, "hidden": 256, "n_heads": 8, "n_kv_heads": 2, "ffn": 512}  # head_dim 32, K-quant rows
BOUND = 3e-4

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(autouse=True)
def kernels():
    if not cpu_kernels.available():
        pytest.skip("no AVX-512 kernels on this CPU: the op-by-op path is the only one")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def drive(shard: ModelShard, fused: bool) -> list[torch.Tensor]:
    """Logits of a ragged prefill of 3 prompts, 5 batched decode steps, then decode of 2 of them (the middle one
    done), with fixed token ids so both paths see the same inputs."""
    shard.fused_decode = fused
    rng = np.random.default_rng(0)
    vocab = shard.cfg.vocab_size
    cache = shard.new_cache(64)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (5, 9, 2)]
    outs = [shard(torch.tensor([t for p in prompts for t in p]), [0, 1, 2], [len(p) for p in prompts], cache)]
    for _ in range(5):
        outs.append(shard(torch.tensor(rng.integers(0, vocab, 3)), [0, 1, 2], [1, 1, 1], cache))
    cache.free(1)
    for _ in range(2):
        outs.append(shard(torch.tensor(rng.integers(0, vocab, 2)), [0, 2], [1, 1], cache))
    outs.append(shard(torch.tensor([7]), [2], [1], cache))  # one sequence alone
    return outs


def assert_paths_agree(shard: ModelShard) -> None:
    ref = drive(shard, fused=False)
    got = drive(shard, fused=True)
    assert shard._decode_plan, "the fused plan should apply to this shard"
    for r, g in zip(ref, got):
        assert rel_err(g, r) < BOUND
        assert torch.equal(g.argmax(-1), r.argmax(-1))


@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("type_name", NATIVE_TYPES)
def test_fused_equals_op_by_op(tiny_gguf_factory, type_name, kv):
    path = tiny_gguf_factory(**SHAPE, dtype=type_name.lower(), n_layers=3)
    shard = ModelShard.from_file(path, quant="native", kv_dtype=KV_DTYPES[kv])
    assert_paths_agree(shard)


def test_mixed_types_in_one_projection(tiny_gguf_factory):
    """A Q4_K_M file's layers hold q, k in one type and v (and some down) in another: Stacked parts."""
    path = tiny_gguf_factory(**SHAPE, dtype="q4_0", n_layers=2)
    cfg = read_config(path)
    spec = ShardSpec.full(cfg)
    weights = load_weights(path, cfg, spec, quant="native")
    for key in ("layers.0.v", "layers.1.down", "layers.1.up"):
        rows = weights[key]
        values = rows.dequantize().numpy()
        weights[key] = GGUFRows(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0), "Q8_0", rows.in_features)
    shard = ModelShard(cfg, spec, weights, "native")
    assert isinstance(shard.layers[0].wqkv, Stacked) and isinstance(shard.layers[1].wgu, Stacked)
    assert isinstance(shard.layers[1].wdown, NativeMatrix) and shard.layers[1].wdown.type_name == "Q8_0"
    assert_paths_agree(shard)


def test_qwen2_bias(tiny_gguf_factory):
    shard = ModelShard.from_file(tiny_gguf_factory(**SHAPE, arch="qwen2", dtype="q8_0", n_layers=2), quant="native")
    assert shard.layers[0].bqkv is not None
    assert_paths_agree(shard)


def test_qwen3_qk_norms(tmp_path):
    path = write_tiny_family_gguf(tmp_path / "qwen3.gguf", "qwen3", hidden=256, n_heads=8, n_kv_heads=2, head_dim=32,
                                  ffn=512, n_layers=2, dtype="q4_1")
    shard = ModelShard.from_file(path, quant="native")
    assert shard.layers[0].q_norm is not None
    assert_paths_agree(shard)


def test_where_it_does_not_apply_the_op_by_op_path_runs(tiny_gguf_factory):
    q8_cache = ModelShard.from_file(tiny_gguf_factory(**SHAPE, dtype="q4_0", n_layers=2), quant="native",
                                     kv_dtype=KV_DTYPES["q8_0"])
    # head_dim 16: our attention kernels take multiples of 32
    narrow_heads = ModelShard.from_file(tiny_gguf_factory(vocab=1024, dtype="q4_0", n_layers=2), quant="native")
    for shard in (q8_cache, narrow_heads):
        drive(shard, fused=True)
        assert shard._decode_plan is False
    off = ModelShard.from_file(tiny_gguf_factory(**SHAPE, dtype="q4_0", n_layers=2), quant="native")
    drive(off, fused=False)
    assert off._decode_plan is None  # never built


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1"])
def test_tensor_and_pipeline_shards(tiny_gguf_factory, type_name):
    """TP2 (the o and down all-reduce called from inside the fused step) × PP2, fused vs op-by-op, same plan."""
    path = tiny_gguf_factory(**SHAPE, dtype=type_name.lower(), n_layers=4)
    cfg = read_config(path)
    plan = make_plan(cfg, [(0, 2), (2, 4)], [(0, 1), (1, 2)], [(0, 256), (256, 512)])

    def run(fused: bool) -> list[torch.Tensor]:
        stages = [[ModelShard(cfg, s, load_weights(path, cfg, s, quant="native"), "native") for s in stage]
                  for stage in plan]
        for stage in stages:
            for shard in stage:
                shard.fused_decode = fused
        pipe = LocalPipeline([LocalStage(stage) for stage in stages])
        try:
            caches = pipe.new_cache(64)
            rng = np.random.default_rng(1)
            outs = [pipe.forward(torch.tensor(rng.integers(0, 1024, 9)), [0, 1], [4, 5], caches, output="logits")]
            for _ in range(4):
                outs.append(pipe.forward(torch.tensor(rng.integers(0, 1024, 2)), [0, 1], [1, 1], caches,
                                         output="logits"))
            if fused:
                assert all(shard._decode_plan for stage in stages for shard in stage)
            return outs
        finally:
            pipe.close()

    for r, g in zip(run(False), run(True)):
        assert rel_err(g, r) < BOUND
