import json

import pytest

from ollama_distributed.model.config import ModelConfig
from ollama_distributed.scheduler import PartitionPlan, PlanConfig, PlanFormatError, Workload, plan
from ollama_distributed.scheduler.profile import PRESETS, preset_profile

from .helpers import GB, cluster, node


def _tp_plan() -> PartitionPlan:
    prof = preset_profile("smollm2-135m")
    c = cluster(node("a", 1 * GB), node("b", 1 * GB), node("c", 1 * GB))
    return plan(prof, c, Workload(), PlanConfig(strategy="tensor"))


def test_json_has_the_issue_fields_and_round_trips():
    p = _tp_plan()
    d = json.loads(p.to_json())
    assert set(d) >= {"model", "strategy", "stages", "predicted", "reason", "plan_id"}
    assert set(d["predicted"]) == {"decode_ms_per_token", "prefill_ms", "tokens_per_s"}
    sh = d["stages"][0]["shards"][0]
    assert set(sh) == {"node", "heads", "kv_heads", "ffn", "memory_bytes"}
    assert PartitionPlan.from_json(p.to_json()) == p
    assert PartitionPlan.from_json(p.to_json()).plan_id == p.plan_id


def test_shard_specs_for_the_runtime():
    p = _tp_plan()
    cfg = PRESETS["smollm2-135m"]
    specs = p.shard_specs(cfg)
    assert len(specs) == 1 and len(specs[0]) >= 2
    for j, spec in enumerate(specs[0]):
        spec.validate(cfg)
        assert spec.has_embedding and spec.has_output == (j == 0)
        assert spec.heads(cfg) == p.stages[0].shards[j].heads


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.pop("stages"), "stages"),
    (lambda d: d.update(strategy="magic"), "strategy must be one of"),
    (lambda d: d["stages"][0]["shards"][0].update(kv_heads=[0]), "kv_heads must be a"),
    (lambda d: d["stages"][0]["shards"][0].update(memory_bytes="lots"), "memory_bytes must be an integer"),
    (lambda d: d.update(plan_id="0" * 12), "does not match"),
    (lambda d: d["stages"][0]["shards"].append(dict(d["stages"][0]["shards"][0])), "more than one shard"),
])
def test_malformed_json_raises_plan_format_error(mutate, needle):
    d = json.loads(_tp_plan().to_json())
    mutate(d)
    with pytest.raises(PlanFormatError, match=needle):
        PartitionPlan.from_json(json.dumps(d))


def test_validate_catches_gaps_and_overlaps():
    p = _tp_plan()
    prof = preset_profile("smollm2-135m")
    p.validate(prof)
    d = json.loads(p.to_json())
    d.pop("plan_id")
    d["stages"][0]["shards"][1]["ffn"][0] += 1  # a gap in the FFN columns
    with pytest.raises(PlanFormatError, match="ffn"):
        PartitionPlan.from_dict(d).validate(prof)
    d = json.loads(p.to_json())
    d.pop("plan_id")
    d["stages"][0]["layers"] = [0, 29]
    with pytest.raises(PlanFormatError, match="cover layers"):
        PartitionPlan.from_dict(d).validate(prof)
    with pytest.raises(PlanFormatError, match="not valid JSON"):
        PartitionPlan.from_json("{")


def test_profile_from_config_matches_published_parameter_counts():
    # Llama-2-7B has 6.74 B parameters, Llama-3-8B 8.03 B, SmolLM2-135M 134.5 M (tied embeddings)
    assert preset_profile("llama-7b").total_params == 6_738_415_616
    assert preset_profile("llama3-8b").total_params == 8_030_261_248
    assert preset_profile("smollm2-135m").total_params == 134_515_008
    cfg = ModelConfig(arch="llama", n_layers=2, hidden_size=8, n_heads=4, n_kv_heads=2, ffn_size=16, vocab_size=10,
                      context_length=32)
    from ollama_distributed.scheduler import ModelProfile
    prof = ModelProfile.from_config(cfg, dtype="f32")
    # q 8x8 + k 4x8 + v 4x8 + o 8x8 = 192, gate/up/down 3x16x8 = 384, 2 norms of 8 = 16: 592 per layer
    assert prof.layer_params == 592 and prof.layer_bytes == 592 * 4


def test_scheduler_is_pure():
    """The planner imports neither torch, Ray, numpy nor sockets (it must run anywhere, fast)."""
    import subprocess
    import sys
    code = ("import sys, ollama_distributed.scheduler as s; "
            "print(','.join(m for m in ('torch', 'ray', 'numpy', 'socket', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
