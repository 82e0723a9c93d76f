"""`ollama-distributed node drain NODE`: move every model off a node of the server's cluster without failing
requests (the server re-plans on the other nodes and replays in-flight sequences; nothing is planned on the node
afterwards). Talks to the server at OLLAMA_HOST, like the other model commands."""

from __future__ import annotations

import typer

from ..service.client import Client, ServerError
from ._app import app

node_app = typer.Typer(help="Manage the nodes of the server's cluster.", no_args_is_help=True)
app.add_typer(node_app, name="node")


@node_app.command("drain")
def drain(node: str = typer.Argument(..., help="Node name, as `ollama-distributed cluster` lists it.")) -> None:
    """Move every model off NODE without failing requests."""
    try:
        with Client(None, timeout=None) as c:
            out = c.post(f"/api/distributed/nodes/{node}/drain", {})
    except ServerError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    moved = ", ".join(out.get("moved", [])) or "no model was using it"
    typer.echo(f"drained {node}: {moved}")
