"""The typer application; each command lives in its own module of this package and registers itself."""

import typer

app = typer.Typer(
    name="ollama-distributed",
    help="Run one large language model across a cluster of machines, behind the Ollama API.",
    no_args_is_help=True,
    add_completion=False,
)
