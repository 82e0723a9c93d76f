"""Planning inputs on the runtime side (no Ray): uniform plans on the quantisation-block grid, and one profile
construction (distributed_run.model_profile) for plan_for_cluster, recovery, the learning loop and `plan`."""

import pytest
import torch

from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.distributed_run import default_workload, model_profile, profile_dtype
from ollama_distributed.runtime.placement import split_on_grid, uniform_plan


def test_split_on_grid():
    assert split_on_grid(128, [2.0, 1.0], 32) == [(0, 96), (96, 128)]
    assert split_on_grid(128, [2.0, 1.0]) == [(0, 85), (85, 128)]  # per column without a grid
    assert split_on_grid(128, [1.0, 1.0, 1.0], 32) == [(0, 64), (64, 96), (96, 128)]
    # fewer grid units than parts: unit by unit (the loader keeps off-grid slices dense)
    assert split_on_grid(256, [1.0, 1.0], 256) == [(0, 128), (128, 256)]


def test_uniform_plan_on_the_grid(tiny_gguf_factory):
    path = tiny_gguf_factory(dtype="q8_0", vocab=512)
    cfg = read_config(path)
    plan = uniform_plan(cfg, [["a", "b", "c"]], "tiny", ffn_step=32)
    assert [s["ffn"] for s in plan["stages"][0]["shards"]] == [[0, 64], [64, 96], [96, 128]]


def test_profile_dtype_names_the_weight_format():
    assert profile_dtype("auto") == "auto"
    assert profile_dtype(torch.float32) == "float32"
    assert profile_dtype(torch.float32, "native") == "auto"
    assert profile_dtype(torch.bfloat16, "int4") == "int4"
    with pytest.raises(ValueError, match="unknown dtype 'f8'"):
        profile_dtype("f8")


def test_model_profile_agrees_with_the_plan_cli(tiny_gguf_factory):
    from ollama_distributed.cli.plan_cmd import resolve_profile

    path = tiny_gguf_factory(dtype="q4_0", vocab=512)
    for dtype, kv in (("auto", None), ("auto", "q8_0"), ("float32", None), ("int4", "f16")):
        assert model_profile(path, dtype, kv) == resolve_profile(str(path), dtype, kv), (dtype, kv)
    assert model_profile(path, torch.float32, quant="native") == model_profile(path)
    assert default_workload(2048, 64).context_tokens == 64


def test_model_profile_of_an_hf_directory_counts_its_dtype(tiny_hf_dir_factory):
    import json

    from ollama_distributed.model import formats

    d = tiny_hf_dir_factory()
    own = json.loads((d / "config.json").read_text()).get("torch_dtype") or "bfloat16"
    prof = model_profile(d, "auto")
    assert formats.hf_tensor_type(d) == formats.HF_DTYPE_TYPES[own]
    assert prof.weight_bytes == pytest.approx(formats.bytes_per_element(formats.HF_DTYPE_TYPES[own]))
    assert prof.total_weight_bytes == pytest.approx(prof.total_params * prof.weight_bytes)
    assert prof.kv_bytes == 2  # f16 cache for auto
