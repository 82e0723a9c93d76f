"""Ollama model-management endpoints: /, /api/version, /api/tags, /api/show, /api/ps, /api/create, /api/copy,
/api/delete, /api/blobs/:digest, /api/pull, /api/push (docs/api.md; checklist §1, 2, 8-11)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from .. import __version__
from ..service import creator
from ..service.gguf_info import read_gguf_summary
from ..service.modelfile import parameters_text, render_modelfile
from ..service.store import (
    LICENSE_LAYER, MESSAGES_LAYER, PARAMS_LAYER, SYSTEM_LAYER, TEMPLATE_LAYER, ModelEntry, ModelStore, parse_digest,
)
from .common import iterate_in_thread, resolve_model, state, stream_or_last
from .errors import APIError, parse_body, read_json

log = logging.getLogger(__name__)
router = APIRouter()


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class ShowRequest(_Req):
    model: str | None = None
    name: str | None = None  # legacy
    verbose: bool | None = None


class CreateRequest(_Req):
    model: str | None = None
    name: str | None = None
    from_: str | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = None
    modelfile: str | None = None
    stream: bool | None = None


class CopyRequest(_Req):
    source: str | None = None
    destination: str | None = None


class NameRequest(_Req):
    model: str | None = None
    name: str | None = None
    insecure: bool | None = None
    stream: bool | None = None


@router.api_route("/", methods=["GET", "HEAD"], response_class=PlainTextResponse)
async def root() -> str:
    return "Ollama is running"


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> dict[str, str]:
    return {"version": __version__}


def tag_item(entry: ModelEntry) -> dict[str, Any]:
    return {
        "name": entry.name.display,
        "model": entry.name.display,
        "modified_at": entry.modified_at.isoformat(),
        "size": entry.size,
        "digest": entry.digest,
        "details": entry.details,
    }


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(request: Request) -> dict[str, Any]:
    entries = await asyncio.to_thread(state(request).store.list)
    return {"models": [tag_item(e) for e in entries]}


def _layer_text(store: ModelStore, entry: ModelEntry, media_type: str) -> str | None:
    layer = entry.layer(media_type)
    return store.read_blob_text(layer.digest) if layer else None


def show_model(store: ModelStore, entry: ModelEntry, verbose: bool) -> dict[str, Any]:
    """The /api/show body (blocking: reads the GGUF header)."""
    summary = read_gguf_summary(entry.model_path, keep_array_len=-1 if verbose else 64, with_tensors=verbose)
    info = {k: v for k, v in summary.metadata.items() if k not in ("general.name", "tokenizer.chat_template")}
    if not verbose:
        # Token arrays are large; Ollama sends them empty unless verbose (server/routes.go GetModelInfo).
        info = {k: ([] if isinstance(v, list) and k.startswith("tokenizer.ggml.") else v) for k, v in info.items()}
    info["general.parameter_count"] = summary.parameter_count
    params = json.loads(_layer_text(store, entry, PARAMS_LAYER) or "{}")
    template = _layer_text(store, entry, TEMPLATE_LAYER)
    chat_template = summary.metadata.get("tokenizer.chat_template") or ""
    system = _layer_text(store, entry, SYSTEM_LAYER)
    license_text = _layer_text(store, entry, LICENSE_LAYER)
    messages = json.loads(_layer_text(store, entry, MESSAGES_LAYER) or "[]")
    body: dict[str, Any] = {
        "modelfile": render_modelfile(str(entry.model_path), template, system, params,
                                      [license_text] if license_text else [], messages),
        "parameters": parameters_text(params),
        "template": template if template is not None else chat_template,
        "details": entry.details,
        "model_info": info,
        "capabilities": capabilities_of(chat_template),
        "modified_at": entry.modified_at.isoformat(),
    }
    if system is not None:
        body["system"] = system
    if license_text is not None:
        body["license"] = license_text
    if messages:
        body["messages"] = messages
    if verbose:
        body["tensors"] = [{"name": t["name"], "type": t["type"], "shape": t["shape"]} for t in summary.tensors]
    return body


def capabilities_of(chat_template: str) -> list[str]:
    """From the GGUF chat template, without loading the model (same rule as a loaded model's template)."""
    caps = ["completion"]
    if chat_template:
        try:
            from ..model.chat_template import ChatTemplate

            if ChatTemplate(chat_template, "", "").supports_tools:
                caps.append("tools")
        except Exception as exc:  # noqa: BLE001 - a template that does not compile only loses capabilities
            log.debug("chat template does not compile: %s", exc)
    return caps


@router.post("/api/show")
async def show(request: Request) -> Any:
    st = state(request)
    req: ShowRequest = parse_body(ShowRequest, await read_json(request))
    entry = resolve_model(st.store, req.model or req.name)
    return await asyncio.to_thread(show_model, st.store, entry, bool(req.verbose))


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    manager = state(request).manager
    # a copy superseded by a pull/create only finishes its requests: the name's entry is its replacement
    items = [manager.ps_entry(r) for r in manager.runners() if not r.superseded]
    items.sort(key=lambda m: m["expires_at"], reverse=True)
    return {"models": items}


@router.post("/api/create")
async def create(request: Request) -> Any:
    st = state(request)
    body = await read_json(request)
    if "from" in body:
        body["from_"] = body.pop("from")
    req: CreateRequest = parse_body(CreateRequest, body)
    name = req.model or req.name
    if not name:
        raise APIError(400, "model is required")
    for fname, digest in (req.files or {}).items():
        parse_digest(digest)  # 400 on a malformed digest before any work

    def run():
        return creator.create_model(
            st.store, name, from_=req.from_, files=req.files, template=req.template, system=req.system,
            license=req.license, parameters=req.parameters, messages=req.messages, modelfile=req.modelfile,
            quantize=req.quantize, adapters=req.adapters,
        )

    return await stream_or_last(_then_supersede(st, name, iterate_in_thread(run)), req.stream is not False)


async def _then_supersede(st: Any, name: str, lines: Any) -> Any:
    """Pass status lines through; before the final "success", replace a loaded copy of `name` that runs other
    weights than the name now points at (one loaded copy per model: /api/ps and keep_alive see one entry)."""
    async for obj in lines:
        if obj.get("status") == "success":
            await st.manager.supersede(await asyncio.to_thread(st.store.get, name))
        yield obj


@router.post("/api/pull")
async def pull(request: Request) -> Any:
    st = state(request)
    req: NameRequest = parse_body(NameRequest, await read_json(request))
    name = req.model or req.name
    if not name:
        raise APIError(400, "model is required")
    lines = iterate_in_thread(lambda: creator.pull_model(st.store, name))
    return await stream_or_last(_then_supersede(st, name, _then_stage(st, name, lines)), req.stream is not False)


async def _then_stage(st: Any, name: str, lines: Any) -> Any:
    """Pass status lines through; before the final "success", on a distributed server, have the nodes that would
    run the model fetch the slices they lack, streaming each node's progress (service/prefetch.py)."""
    from ..service.prefetch import prefetch_status

    async for obj in lines:
        if obj.get("status") == "success":
            entry = await asyncio.to_thread(st.store.get, name)
            async for line in iterate_in_thread(lambda: prefetch_status(st.manager, entry)):
                yield line
        yield obj


@router.post("/api/push")
async def push(request: Request) -> Any:
    req: NameRequest = parse_body(NameRequest, await read_json(request))
    if not (req.model or req.name):
        raise APIError(400, "model is required")
    raise APIError(500, "push model manifest: cannot reach any registry: this server has no registry access")


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    st = state(request)
    req: CopyRequest = parse_body(CopyRequest, await read_json(request))
    if not req.source or not req.destination:
        raise APIError(400, "source and destination are required")
    await asyncio.to_thread(st.store.copy, req.source, req.destination)
    return Response(status_code=200)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    st = state(request)
    req: NameRequest = parse_body(NameRequest, await read_json(request))
    name = req.model or req.name
    if not name:
        raise APIError(400, "model is required")
    entry = st.store.get(name)
    await st.manager.unload(entry)
    await asyncio.to_thread(st.store.delete, name)
    return Response(status_code=200)


@router.head("/api/blobs/{digest}")
async def blob_exists(digest: str, request: Request) -> Response:
    return Response(status_code=200 if state(request).store.has_blob(digest) else 404)


@router.post("/api/blobs/{digest}")
async def blob_upload(digest: str, request: Request) -> Response:
    store = state(request).store
    parse_digest(digest)
    if store.has_blob(digest):
        async for _ in request.stream():  # drain so the client sees a clean response
            pass
        return Response(status_code=200)
    tmp = store.new_upload_path()
    try:
        with open(tmp, "wb") as f:
            buf: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                buf.append(chunk)
                size += len(chunk)
                if size >= 8 << 20:
                    await asyncio.to_thread(f.write, b"".join(buf))
                    buf, size = [], 0
            if buf:
                await asyncio.to_thread(f.write, b"".join(buf))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    created = await asyncio.to_thread(store.adopt_blob_file, digest, tmp)
    return Response(status_code=201 if created else 200)
