"""`ollama-distributed cluster`: show the Ray nodes a plan could use and what was measured on them.

`--address HEAD:PORT` (or `auto`) joins a running cluster; otherwise `--local-nodes N [--node-memory SIZE]` starts N
Ray nodes on this machine (127.0.0.1 only) for as long as the command runs. Every node is probed (memory, GEMV
bandwidth, matmul FLOP/s) and every node pair's link (gloo send/recv latency and bandwidth); `--json` prints the
same as JSON, with the scheduler's ClusterSpec those measurements make.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import typer

from ._app import app

log = logging.getLogger(__name__)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command("cluster")
def cluster(
    address: Optional[str] = typer.Option(None, "--address", help="Join the Ray cluster at HEAD:PORT (or 'auto')."),
    local_nodes: Optional[int] = typer.Option(None, "--local-nodes", help="Start N Ray nodes on this machine."),
    node_memory: Optional[str] = typer.Option(None, "--node-memory", help="Memory budget per local node, e.g. 4GB."),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Probe nodes and links."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """List the cluster's nodes with their measured memory, bandwidth, FLOP/s and links."""
    from ..runtime.cluster import ClusterError, cluster_from_cli

    try:
        handle = cluster_from_cli(address, local_nodes, node_memory)
    except (ClusterError, ValueError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        nodes = handle.nodes()
        measured = handle.measure() if measure else None
        spec = None
        if measured is not None:
            from ..runtime.measure import to_cluster_spec

            spec = to_cluster_spec(measured)
        if as_json:
            out = {
                "address": handle.address,
                "ray_temp_dir": handle.temp_dir,
                "nodes": [n.to_dict() for n in nodes],
                "measured": measured.to_dict() if measured else None,
                "cluster_spec": spec.to_dict() if spec else None,
            }
            typer.echo(json.dumps(out, indent=2))
        else:
            _print_tables(handle.address, nodes, measured)
    finally:
        handle.shutdown()


def _print_tables(address: str, nodes, measured) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    by_name = {m.name: m for m in measured.nodes} if measured else {}
    t = Table(title=f"Ray cluster {address}")
    for col in ("node", "address", "ray node id", "CPUs", "GPUs", "budget", "mem available", "GEMV bandwidth", "FLOP/s"):
        t.add_column(col)
    for n in nodes:
        m = by_name.get(n.name)
        t.add_row(
            n.name + (" (head)" if n.is_head else ""),
            n.address,
            n.node_id[:12],
            f"{n.cpus:g}",
            f"{n.gpus:g}",
            _fmt_bytes(n.memory_budget),
            _fmt_bytes(m.memory_available) if m else "-",
            f"{m.memory_bandwidth / 1e9:.2f} GB/s" if m else "-",
            f"{m.flops / 1e9:.2f} GFLOP/s" if m else "-",
        )
    console.print(t)
    if measured and measured.links:
        lt = Table(title="links (gloo send/recv)")
        for col in ("a", "b", "latency", "bandwidth"):
            lt.add_column(col)
        for link in measured.links:
            lt.add_row(link.a, link.b, f"{link.latency * 1e6:.0f} µs", f"{link.bandwidth / 1e9:.2f} GB/s")
        console.print(lt)
