"""Planning the dense families beyond llama: presets for the big ones, a file's real bytes whatever its tensor
layout (phi3's fused tensors, gemma3's extra norms), and the KV cache of sliding-window layers counted at their
window (model/kv_cache.py keeps those as rings)."""

import gguf
import pytest

from ollama_distributed.model import formats
from ollama_distributed.scheduler import ModelProfile, PlanConfig, Workload, plan
from ollama_distributed.scheduler.cost import CostModel
from ollama_distributed.scheduler.profile import PRESETS, TensorBytes, preset_profile
from tests.helpers.tiny_gguf import FAMILIES, write_tiny_family_gguf
from tests.scheduler.helpers import GB, cluster, node


@pytest.mark.parametrize("arch", FAMILIES)
def test_profile_counts_every_tensor_of_the_file(tmp_path, arch):
    from ollama_distributed.cli.plan_cmd import config_from_gguf

    path = write_tiny_family_gguf(tmp_path / f"{arch}.gguf", arch, dtype="q8_0", vocab=512)
    cfg = config_from_gguf(path)
    prof = ModelProfile.from_config(cfg, "auto", tensor_bytes=TensorBytes.from_tensors(
        cfg, formats.read_gguf_tensors(path)))
    real = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    assert prof.total_weight_bytes == sum(real.values())  # q/k norms, post norms, fused qkv and gate|up included


@pytest.mark.parametrize("name, gb, params", [("gemma3-27b", (15.5, 17.5), 27.0), ("qwen3-32b", (18.5, 20.5), 32.8)])
def test_presets_plan(name, gb, params):
    """Published sizes (Gemma 3 27B's text model 27.0B parameters, Qwen3-32B 32.8B), counted as Q4_K_M (Ollama's
    default download: 17 GB and 20 GB in its library), planned on two 12 GB nodes."""
    assert name in PRESETS
    assert preset_profile(name, "f16").total_params / 1e9 == pytest.approx(params, abs=0.05)
    prof = preset_profile(name, "auto")
    assert gb[0] * 1e9 <= prof.total_weight_bytes <= gb[1] * 1e9
    spec = cluster(node("a", 12 * GB), node("b", 12 * GB))
    result = plan(prof, spec, Workload(prompt_tokens=256, output_tokens=256), PlanConfig(strategy="pipeline"))
    assert len(result.stages) == 2


def test_sliding_window_layers_count_their_window():
    """gemma3-27b: 52 of 62 layers slide over 1024 positions; at 32k context the cache is 10 layers' full rows
    plus 52 layers' windows, and a context within the window counts every layer fully."""
    prof = preset_profile("gemma3-27b", "auto")
    assert (prof.sliding_window, prof.sliding_layers) == (1024, 52)
    assert prof.kv_context(32768) == pytest.approx((10 * 32768 + 52 * 1024) / 62)
    assert prof.kv_context(1000) == 1000
    spec = cluster(node("a", 64 * GB))
    long = Workload(prompt_tokens=32000, output_tokens=768)
    cm = CostModel(prof, spec, long)
    per_layer = prof.n_kv_heads * prof.kv_unit_bytes_per_token * (10 * 32768 + 52 * 1024) / 62
    assert cm.kv_unit_mem * prof.n_kv_heads == pytest.approx(per_layer)
    full = prof.n_kv_heads * prof.kv_unit_bytes_per_token * 32768
    assert cm.kv_unit_mem * prof.n_kv_heads < full / 4  # what the ring saves over a cache of every position
