"""`ollama-distributed run` on the real tiny GGUF: one-shot and piped interactive chat, fixed seed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ollama_distributed.cli import app
from ollama_distributed.cli.run_cmd import ModelNotFoundError, format_duration, resolve_model
from ollama_distributed.model.chat_template import ChatTemplate
from ollama_distributed.model.options import GenerationOptions
from ollama_distributed.model.tokenizer import Tokenizer
from ollama_distributed.runtime.engine import GenerationRequest, InferenceEngine
from ollama_distributed.runtime.local_executor import LocalExecutor

runner = CliRunner()
OPTS = {"seed": 7, "num_predict": 12, "temperature": 0.9}
ARGS = ["--seed", "7", "--num-predict", "12", "--temperature", "0.9"]


@pytest.fixture(scope="module")
def expected(tiny_gguf):
    """What the engine answers for a conversation, computed without the CLI."""
    tok = Tokenizer.from_gguf(tiny_gguf)
    template = ChatTemplate.from_tokenizer(tok)
    eng = InferenceEngine(LocalExecutor(tiny_gguf, max_seq_len=4096, quant="native"), tok)  # run's default: auto
    opts = GenerationOptions.from_dict(OPTS)

    def answer(messages):
        ids = tok.encode(template.render(messages, add_generation_prompt=True))
        return eng.generate(GenerationRequest(ids, opts)).text

    yield answer
    eng.close()


def test_one_shot_prompt_streams_the_engine_answer(tiny_gguf, expected):
    r1 = runner.invoke(app, ["run", str(tiny_gguf), "Why is the sky blue?", *ARGS])
    assert r1.exit_code == 0, r1.output
    want = expected([{"role": "user", "content": "Why is the sky blue?"}])
    assert want.strip() and r1.stdout == want + "\n"
    r2 = runner.invoke(app, ["run", str(tiny_gguf), "Why is the sky blue?", *ARGS])
    assert r2.stdout == r1.stdout  # fixed seed: reproducible
    r3 = runner.invoke(app, ["run", str(tiny_gguf), "Why is the sky blue?", *ARGS[:-1], "0", "--seed", "8"])
    assert r3.exit_code == 0 and r3.stdout != r1.stdout


def test_interactive_chat_keeps_history_and_bye_exits(tiny_gguf, expected):
    r = runner.invoke(app, ["run", str(tiny_gguf), *ARGS, "--verbose"], input="hello\n\nhow are you?\n/bye\nnever read\n")
    assert r.exit_code == 0, r.output
    first = expected([{"role": "user", "content": "hello"}])
    second = expected(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "how are you?"},
        ]
    )
    assert r.stdout == f"{first}\n\n{second}\n\n"
    assert r.stderr.count("\neval rate:") == 2 and r.stderr.count("prompt eval count:") == 2
    loads = [line for line in r.stderr.splitlines() if line.startswith("load duration:")]
    assert loads[0] != "load duration:        0s" and loads[1] == "load duration:        0s"


def test_errors_are_one_line(tiny_gguf):
    r = runner.invoke(app, ["run", "no-such-model:7b", "hi"])
    assert r.exit_code == 1 and "model 'no-such-model:7b' not found" in r.stderr
    r = runner.invoke(app, ["run", str(tiny_gguf), "hi", "--num-ctx", "0"])
    assert r.exit_code == 1 and "num_ctx" in r.stderr
    with pytest.raises(ModelNotFoundError):
        resolve_model("/nonexistent/file.gguf")


def test_format_duration_like_go():
    assert format_duration(1.5) == "1.5s"
    assert format_duration(0.0123456) == "12.3456ms"
    assert format_duration(0.000002) == "2µs"
    assert format_duration(0) == "0s"


@pytest.mark.slow
def test_run_on_local_pipeline_equals_in_process(tiny_gguf, expected):
    """`run --local-nodes 2 --strategy pipeline` (real raylets, in a subprocess so Ray owns its own driver) streams
    the same seeded answer as the in-process engine, and says where the layers went."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ollama_distributed.cli", "run", str(tiny_gguf), "Why is the sky blue?", *ARGS,
           "--local-nodes", "2", "--node-memory", "34MiB", "--strategy", "pipeline", "--verbose"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="200"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == expected([{"role": "user", "content": "Why is the sky blue?"}]) + "\n"
    assert "plan: pipeline (layers 0-" in r.stderr and "node1" in r.stderr, r.stderr[-2000:]


def test_run_int4_streams_the_int4_engine_answer(tiny_gguf_factory):
    """`--dtype int4` loads the file's 4-bit blocks in-process; the CLI prints what that engine generates."""
    path = tiny_gguf_factory(dtype="q4_1")
    tok = Tokenizer.from_gguf(path)
    template = ChatTemplate.from_tokenizer(tok)
    eng = InferenceEngine(LocalExecutor(path, max_seq_len=4096, quant="int4"), tok)
    try:
        ids = tok.encode(template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True))
        want = eng.generate(GenerationRequest(ids, GenerationOptions.from_dict(OPTS))).text
    finally:
        eng.close()
    r = runner.invoke(app, ["run", str(path), "hi", *ARGS, "--dtype", "int4"])
    assert r.exit_code == 0, r.output
    assert want.strip() and r.stdout == want + "\n"
    bad = runner.invoke(app, ["run", str(path), "hi", "--dtype", "int3"])
    assert bad.exit_code == 1 and "unknown dtype 'int3': expected auto|float32|bfloat16|float16|int4" in bad.stderr


def test_run_int4_on_local_pipeline_fits_where_float32_does_not(tiny_gguf_factory):
    """Two 16 MiB nodes cannot hold the tiny model in float32 (41.9 MB with its KV cache), but hold it as int4:
    the plan is sized for 4-bit layers and the workers load them (real raylets, in a subprocess)."""
    import os
    import subprocess
    import sys

    path = tiny_gguf_factory(dtype="q4_1")
    base = [sys.executable, "-m", "ollama_distributed.cli", "run", str(path), "hi", *ARGS,
            "--local-nodes", "2", "--node-memory", "16MiB", "--strategy", "pipeline"]
    env = dict(os.environ, COLUMNS="200")
    r = subprocess.run(base + ["--dtype", "int4", "--verbose"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    tok = Tokenizer.from_gguf(path)
    eng = InferenceEngine(LocalExecutor(path, max_seq_len=4096, quant="int4"), tok)
    try:
        ids = tok.encode(ChatTemplate.from_tokenizer(tok).render([{"role": "user", "content": "hi"}],
                                                                 add_generation_prompt=True))
        want = eng.generate(GenerationRequest(ids, GenerationOptions.from_dict(OPTS))).text
    finally:
        eng.close()
    assert r.stdout == want + "\n"  # pipeline stages of an int4 model compute exactly what one process does
    assert "plan: pipeline (layers 0-" in r.stderr
    f32 = subprocess.run(base + ["--dtype", "float32"], capture_output=True, text=True, timeout=600, env=env)
    assert f32.returncode == 1 and "needs 41.9 MB" in f32.stderr
