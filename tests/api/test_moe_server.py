"""A mixture-of-experts model served expert-parallel: `serve --local-nodes 2 --strategy tensor` on a tiny random
Qwen3-MoE plans each node a share of every layer's experts (and of the attention heads), and the server's greedy
text equals the in-process engine's on the same file; `/api/distributed/status` shows which node holds which
experts."""

from __future__ import annotations

from pathlib import Path

import httpx
import ollama
import pytest

from tests.helpers.tiny_gguf import write_tiny_qwen3moe_gguf

from .conftest import greedy_texts, serving

pytestmark = pytest.mark.slow
PROMPTS = ["The quick brown fox", "def main():"]


@pytest.fixture(scope="module")
def moe_file(tmp_path_factory) -> Path:
    return write_tiny_qwen3moe_gguf(tmp_path_factory.mktemp("moe") / "tiny-moe.gguf", dtype="q8_0")


@pytest.fixture(scope="module")
def ep_server(tmp_path_factory, moe_file: Path):
    with serving(tmp_path_factory.mktemp("ep-server"), moe_file, ["--local-nodes", "2", "--strategy", "tensor"],
                 timeout=300, name="tiny-moe") as srv:
        yield srv


def test_expert_parallel_generation_matches_in_process(ep_server, moe_file: Path) -> None:
    client = ollama.Client(host=ep_server.url, timeout=600)
    want = greedy_texts(moe_file, PROMPTS, 16)
    for prompt in PROMPTS:
        out = client.generate(model="tiny-moe", prompt=prompt, raw=True, options={"temperature": 0, "num_predict": 16})
        assert out.response == want[prompt], ep_server.log()[-3000:]
    status = httpx.get(ep_server.url + "/api/distributed/status", timeout=120).json()
    model = next(m for m in status["models"] if m["name"] == "tiny-moe:latest")
    plan = model["plans"][0]
    assert plan["strategy"] == "tensor"
    shards = plan["stages"][0]["shards"]
    assert len({s["node_id"] for s in shards}) == 2
    held = sorted(tuple(s["experts"]) for s in shards)
    assert held[0][0] == 0 < held[0][1] == held[1][0] < held[1][1] == 8, held  # each node some of the 8
