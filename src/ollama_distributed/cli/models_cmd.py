"""`ollama-distributed list|ps|show|create|cp|rm|pull`: talk to the server at OLLAMA_HOST, like `ollama` does.

Errors print one line (`Error: ...`) and exit 1. Uploads and imports show rich progress bars.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..service.client import Client, ServerError, run_via_server  # noqa: F401 - run_via_server re-exported
from ._app import app

console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


def _client() -> Client:
    return Client(None, timeout=None)


def _size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ago(iso: str) -> str:
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    secs = (datetime.now(timezone.utc) - then).total_seconds()
    for unit, scale in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if secs >= scale:
            return f"{int(secs // scale)} {unit} ago"
    return "Less than a minute ago" if secs >= 0 else "in the future"


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err_console, transient=False)


def _show_statuses(stream: Iterator[dict[str, Any]]) -> None:
    """Print status lines; lines with total/completed drive a progress bar per digest (started on first use, so
    an early error prints nothing but its one line)."""
    progress: Progress | None = None
    bars: dict[str, Any] = {}
    try:
        for obj in stream:
            status = obj.get("status", "")
            digest = obj.get("digest")
            if digest and obj.get("total"):
                if progress is None:
                    progress = _progress()
                    progress.start()
                if digest not in bars:
                    bars[digest] = progress.add_task(status, total=obj["total"])
                progress.update(bars[digest], completed=obj.get("completed", 0))
            elif progress is not None:
                progress.console.print(status, markup=False, highlight=False)
            else:
                typer.echo(status, err=True)
    finally:
        if progress is not None:
            progress.stop()


@app.command("list")
def list_models() -> None:
    """List models on the server."""
    try:
        with _client() as c:
            models = c.get("/api/tags")["models"]
    except ServerError as exc:
        _fail(str(exc))
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "ID", "SIZE", "MODIFIED"):
        table.add_column(col)
    for m in models:
        table.add_row(m["name"], m["digest"][:12], _size(m["size"]), _ago(m["modified_at"]))
    console.print(table)


@app.command("ps")
def ps() -> None:
    """List loaded models and where they run."""
    try:
        with _client() as c:
            models = c.get("/api/ps")["models"]
    except ServerError as exc:
        _fail(str(exc))
    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "ID", "SIZE", "PLACEMENT", "CONTEXT", "UNTIL"):
        table.add_column(col)
    for m in models:
        p = m.get("placement", {})
        where = f"{p.get('strategy', '?')} on {len(p.get('nodes', []))} node(s)"
        table.add_row(m["name"], m["digest"][:12], _size(m["size"]), where, str(m.get("context_length", "")),
                      m.get("expires_at", ""))
    console.print(table)


@app.command("show")
def show(
    model: str,
    modelfile: bool = typer.Option(False, "--modelfile", help="Print the Modelfile."),
    parameters: bool = typer.Option(False, "--parameters", help="Print the parameters."),
    template: bool = typer.Option(False, "--template", help="Print the template."),
    system: bool = typer.Option(False, "--system", help="Print the system prompt."),
    license: bool = typer.Option(False, "--license", help="Print the license."),
) -> None:
    """Show information about a model."""
    try:
        with _client() as c:
            info = c.post("/api/show", {"model": model})
    except ServerError as exc:
        _fail(str(exc))
    for flag, key in ((modelfile, "modelfile"), (parameters, "parameters"), (template, "template"),
                      (system, "system"), (license, "license")):
        if flag:
            typer.echo(info.get(key, ""))
            return
    mi, details = info.get("model_info", {}), info.get("details", {})
    arch = mi.get("general.architecture", details.get("family", ""))
    rows = [("architecture", arch), ("parameters", details.get("parameter_size", "")),
            ("context length", mi.get(f"{arch}.context_length", "")),
            ("embedding length", mi.get(f"{arch}.embedding_length", "")),
            ("quantization", details.get("quantization_level", ""))]
    typer.echo("  Model")
    for k, v in rows:
        typer.echo(f"    {k:<20}{v}")
    typer.echo("\n  Capabilities")
    for cap in info.get("capabilities", []):
        typer.echo(f"    {cap}")
    if info.get("parameters"):
        typer.echo("\n  Parameters")
        for line in info["parameters"].splitlines():
            typer.echo(f"    {line}")
    if info.get("system"):
        typer.echo("\n  System")
        typer.echo(f"    {info['system']}")


def _upload(c: Client, path: Path) -> str:
    """Hash and upload a local GGUF (progress bars); returns its digest."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with _progress() as progress:
        task = progress.add_task(f"hashing {path.name}", total=size)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                progress.advance(task, len(chunk))
        digest = "sha256:" + h.hexdigest()
        task = progress.add_task(f"uploading {digest[7:19]}", total=size)
        c.upload_blob(digest, str(path), lambda n: progress.advance(task, n))
    return digest


@app.command("create")
def create(
    model: str,
    file: Path = typer.Option(None, "-f", "--file", help="Modelfile to create the model from."),
    from_: Path = typer.Option(None, "--from", help="A GGUF file to create the model from."),
) -> None:
    """Create a model from a Modelfile or a GGUF file."""
    from ..service.modelfile import ModelfileError, parse_modelfile

    if (file is None) == (from_ is None):
        _fail("give exactly one of -f MODELFILE or --from FILE.gguf")
    body: dict[str, Any] = {"model": model, "stream": True}
    source: Path | None = from_
    if file is not None:
        try:
            mf = parse_modelfile(file.read_text(encoding="utf-8"))
        except OSError as exc:
            _fail(f"cannot read {file}: {exc.strerror or exc}")
        except ModelfileError as exc:
            _fail(f"{file}: {exc}")
        base = Path(mf.from_).expanduser()
        if not base.is_absolute():
            base = file.parent / base
        if base.is_file():
            source = base
        else:
            body["from"] = mf.from_
        for key, value in (("template", mf.template), ("system", mf.system), ("parameters", mf.parameters or None),
                           ("messages", mf.messages or None), ("license", mf.license or None)):
            if value is not None:
                body[key] = value
    try:
        with _client() as c:
            if source is not None:
                if not source.is_file():
                    _fail(f"no such file: {source}")
                body["files"] = {source.name: _upload(c, source)}
            _show_statuses(c.stream("/api/create", body))
    except ServerError as exc:
        _fail(str(exc))


@app.command("cp")
def cp(source: str, destination: str) -> None:
    """Copy a model."""
    try:
        with _client() as c:
            c.request("POST", "/api/copy", json={"source": source, "destination": destination})
    except ServerError as exc:
        _fail(str(exc))
    typer.echo(f"copied '{source}' to '{destination}'")


@app.command("rm")
def rm(models: list[str]) -> None:
    """Remove one or more models."""
    try:
        with _client() as c:
            for m in models:
                c.request("DELETE", "/api/delete", json={"model": m})
                typer.echo(f"deleted '{m}'")
    except ServerError as exc:
        _fail(str(exc))


@app.command("pull")
def pull(model: str) -> None:
    """Import a model from the local Ollama store (no registry is reachable)."""
    try:
        with _client() as c:
            _show_statuses(c.stream("/api/pull", {"model": model}))
    except ServerError as exc:
        _fail(str(exc))

