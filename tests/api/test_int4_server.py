"""`serve --dtype int4`: the server runs the GGUF's own 4-bit blocks (model/quant.py), in-process and as a
pipeline on two Ray nodes too small for the float32 model; answers equal the in-process int4 engine's."""

from __future__ import annotations

from pathlib import Path

import httpx
import ollama
import pytest

from .conftest import greedy_texts, serving, start_server

pytestmark = pytest.mark.slow
PROMPT = "The quick brown fox"
OPTIONS = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def q41(tiny_gguf_factory) -> Path:
    return tiny_gguf_factory(dtype="q4_1")


@pytest.fixture(scope="module")
def int4_answer(q41: Path) -> str:
    return greedy_texts(q41, [PROMPT], OPTIONS["num_predict"], quant="int4")[PROMPT]


@pytest.mark.parametrize("where", ["in-process", "pipeline"])
def test_int4_server_answers_like_the_int4_engine(where, q41, int4_answer, tmp_path_factory) -> None:
    # Two 16 MiB nodes cannot hold the float32 model (41.9 MB with its KV cache; tests/cli/test_run_cmd.py).
    args = ["--dtype", "int4"] + (["--local-nodes", "2", "--node-memory", "16MiB", "--strategy", "pipeline",
                                   "--no-autotune"] if where == "pipeline" else [])
    with serving(tmp_path_factory.mktemp(f"int4-{where}"), q41, args, timeout=300) as srv:
        out = ollama.Client(host=srv.url, timeout=600).generate(model="tiny", prompt=PROMPT, raw=True, options=OPTIONS)
        assert out.response == int4_answer, srv.log()[-3000:]
        if where == "pipeline":
            status = httpx.get(srv.url + "/api/distributed/status", timeout=60).json()
            plan = next(m for m in status["models"] if m["name"] == "tiny:latest")["plans"][0]
            assert plan["strategy"] == "pipeline" and len(plan["stages"]) == 2
            assert len({sh["node_id"] for st in plan["stages"] for sh in st["shards"]}) == 2


def test_unknown_dtype_is_refused_at_start(tmp_path_factory) -> None:
    with pytest.raises(RuntimeError, match="unknown dtype 'int3': expected auto\\|float32\\|bfloat16\\|float16\\|int4"):
        start_server(tmp_path_factory.mktemp("bad-dtype"), ["--dtype", "int3"], timeout=60)
