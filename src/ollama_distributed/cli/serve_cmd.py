"""`ollama-distributed serve`: the Ollama-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import logging
import sys

import typer

from ._app import app


@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="Listen address (default: from OLLAMA_HOST, else 127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="Listen port (default: from OLLAMA_HOST, else 11434)."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (HEAD:PORT or 'auto')."),
    local_nodes: int = typer.Option(0, "--local-nodes", help="Start N Ray nodes on this machine."),
    node_memory: str = typer.Option(None, "--node-memory", help="Memory budget per local node, e.g. 2GiB."),
    strategy: str = typer.Option("auto", "--strategy", help="auto|single|pipeline|tensor|hybrid"),
    dtype: str = typer.Option("auto", "--dtype", help="auto|float32|bfloat16|float16|int4 (auto: every tensor in "
                              "its file type, the file's memory; float32/bfloat16/float16: dequantised; int4: "
                              "4-bit groups)."),
    kv_cache_type: str = typer.Option(None, "--kv-cache-type", help="KV cache f32|f16|q8_0 (default: OLLAMA_KV_CACHE_TYPE, "
                                      "else f16 with --dtype auto and the compute dtype otherwise)."),
    max_replicas: int = typer.Option(None, "--max-replicas", help="Copies of a model on disjoint nodes when the "
                                     "cluster holds more than one (default 1, or OLLAMA_DISTRIBUTED_MAX_REPLICAS; "
                                     "0 = as many as fit)."),
    autotune: bool = typer.Option(None, "--autotune/--no-autotune", help="On load with --strategy auto, measure "
                                  "the top 3 candidate plans for a few decode steps and keep the fastest "
                                  "(default on, or OLLAMA_DISTRIBUTED_AUTOTUNE)."),
    replan: bool = typer.Option(None, "--replan/--no-replan", help="When a model is idle, apply drift re-plan "
                                "proposals and better plans after nodes join (default on, or "
                                "OLLAMA_DISTRIBUTED_REPLAN)."),
    api_key: str = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on every endpoint but "
                                "/ and /api/version (default: OLLAMA_DISTRIBUTED_API_KEY, else no key)."),
    log_level: str = typer.Option("info", "--log-level", help="debug|info|warning|error"),
) -> None:
    """Serve the Ollama and OpenAI APIs."""
    import uvicorn

    from ..api.app import create_app
    from ..service.settings import ServerSettings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings.from_env(
            host=host, port=port, address=address, local_nodes=local_nodes, node_memory=node_memory,
            strategy=strategy, dtype=dtype, kv_cache_type=kv_cache_type, max_replicas=max_replicas, autotune=autotune, replan=replan,
            api_key=api_key,
        )
    except ValueError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    from ..model.cpu_kernels import build_in_background

    build_in_background()  # a fresh machine compiles its kernels while the server starts, not at the first request
    where = (f"Ray cluster {settings.address}" if settings.address else
             f"{settings.local_nodes} local Ray nodes" if settings.local_nodes else "in-process")
    typer.echo(f"ollama-distributed listening on http://{settings.host}:{settings.port} (models run {where}; "
               f"store {settings.models_dir})", err=True)
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level.lower(),
                    timeout_graceful_shutdown=5)
    except OSError as exc:
        typer.echo(f"Error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", err=True)
        sys.exit(1)
