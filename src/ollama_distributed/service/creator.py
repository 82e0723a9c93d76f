"""`/api/create` and `/api/pull` as generators of Ollama status objects.

Both are blocking (hashing, copying); the API runs them in a worker thread and streams each yielded status as one
NDJSON line. Errors are typed (`StoreError` subclasses, `ModelFileError`, `InvalidModelNameError`) and raised before
the first `success`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from ..model.errors import ModelFileError
from ..model.options import GenerationOptions
from .gguf_info import validate_gguf
from .modelfile import parse_modelfile
from .names import ModelName
from .store import (
    LICENSE_LAYER, MESSAGES_LAYER, MODEL_LAYER, PARAMS_LAYER, SYSTEM_LAYER, TEMPLATE_LAYER,
    Layer, ModelNotFoundError, ModelStore, StoreError, config_from_summary, link_or_copy, parse_digest,
)

log = logging.getLogger(__name__)

Status = dict[str, Any]


class CreateError(StoreError):
    """A create request that cannot be honoured (bad `from`, unsupported feature)."""

    status = 400


class PullError(StoreError):
    """No source for the requested model: the registry is unreachable and the local stores do not have it."""

    status = 500


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.lower().endswith(".gguf") or os.sep in s and Path(s).exists()


def _check_model_file(path: Path) -> Layer:
    """Validate a GGUF the server can run; returns a Layer with its digest (hashing the file)."""
    summary = validate_gguf(path)
    # The engine's own reader knows which architectures it runs; reject others now rather than at first use.
    from ..model.weights import read_config

    read_config(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    del summary
    return Layer(MODEL_LAYER, "sha256:" + h.hexdigest(), path.stat().st_size)


def create_model(
    store: ModelStore,
    model: str,
    from_: str | None = None,
    files: dict[str, str] | None = None,
    template: str | None = None,
    system: str | None = None,
    license: str | list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    messages: list[dict[str, Any]] | None = None,
    modelfile: str | None = None,
    quantize: str | None = None,
    adapters: dict[str, str] | None = None,
) -> Iterator[Status]:
    """Create (or replace) `model` in the own store. Yields status objects ending with {"status": "success"}."""
    name = ModelName.parse(model)
    if quantize:
        raise CreateError(f"quantize {quantize!r} is not supported by this server; create from a quantized GGUF")
    if adapters:
        raise CreateError("adapters (LoRA) are not supported by this server")
    if modelfile:
        # Legacy form (Ollama < 0.5 clients): the whole Modelfile as text; explicit fields take precedence.
        mf = parse_modelfile(modelfile)
        from_ = from_ or mf.from_
        template = template if template is not None else mf.template
        system = system if system is not None else mf.system
        license = license if license is not None else (mf.license or None)
        parameters = {**mf.parameters, **(parameters or {})}
        messages = messages if messages is not None else (mf.messages or None)
    if parameters:
        # Validate now so a bad PARAMETER fails the create, not every later request (raises InvalidOptionError).
        GenerationOptions.from_dict(parameters)

    base_layers: list[Layer] = []
    config: dict[str, Any] = {}
    weights: Layer | None = None
    pre: list[Status] = []  # statuses describing work done before the first yield (errors come first)
    if files:
        ggufs = [(fname, d) for fname, d in files.items() if fname.lower().endswith(".gguf")] or list(files.items())
        if len(ggufs) != 1:
            raise CreateError(f"expected exactly one GGUF file in 'files', got {len(ggufs)}: {sorted(files)}")
        fname, digest = ggufs[0]
        path = store.blob_path(digest)
        if path is None:
            raise CreateError(f"blob {digest} for file {fname!r} has not been uploaded (POST /api/blobs/{digest})")
        try:
            validate_gguf(path)
            from ..model.weights import read_config

            read_config(path)
        except ModelFileError as exc:
            raise ModelFileError(fname, exc.problem) from exc
        weights = Layer(MODEL_LAYER, "sha256:" + parse_digest(digest), path.stat().st_size)
        config = config_from_summary(store.gguf_summary(path))
        pre = [{"status": "parsing GGUF"}, {"status": f"using existing layer {weights.digest}"}]
    elif from_:
        candidate = Path(from_).expanduser()
        if candidate.is_file() or _looks_like_path(from_):
            if not candidate.is_file():
                raise ModelFileError(candidate, "no such file on the server")
            weights = _check_model_file(candidate)
            target = store.own_blob_path(weights.digest)
            pre = [{"status": "parsing GGUF"}]
            if target.exists():
                pre.append({"status": f"using existing layer {weights.digest}"})
            else:
                pre.append({"status": f"creating new layer {weights.digest}"})
                link_or_copy(candidate, target)
            config = config_from_summary(store.gguf_summary(target))
        else:
            base = store.get(from_)  # ModelNotFoundError → 404, like Ollama's missing base model
            weights = store.ensure_local_blob(base)
            config = dict(base.config)
            base_layers = [l for l in base.layers if l.media_type != MODEL_LAYER]
            pre = [{"status": f"using existing layer {weights.digest}"}]
            if parameters is not None and base.layer(PARAMS_LAYER) is not None:
                inherited = json.loads(store.read_blob_text(base.layer(PARAMS_LAYER).digest))
                parameters = {**inherited, **parameters}
    else:
        raise CreateError("neither 'from' nor 'files' was given: nothing to create the model from")

    yield from pre
    layers = [weights]
    replaced = {
        TEMPLATE_LAYER: template,
        SYSTEM_LAYER: system,
        LICENSE_LAYER: license,
        PARAMS_LAYER: parameters or None,
        MESSAGES_LAYER: messages,
    }
    for layer in base_layers:
        if replaced.get(layer.media_type) is None:
            layers.append(layer)
            yield {"status": f"using existing layer {layer.digest}"}
    for media_type, value in replaced.items():
        if value is None:
            continue
        layers = [l for l in layers if l.media_type != media_type]
        if media_type in (PARAMS_LAYER, MESSAGES_LAYER):
            data = json.dumps(value).encode()
        elif isinstance(value, list):
            data = "\n".join(value).encode()
        else:
            data = str(value).encode()
        blob = store.add_blob_bytes(data)
        layers.append(Layer(media_type, blob.digest, blob.size))
        yield {"status": f"creating new layer {blob.digest}"}
    yield {"status": "writing manifest"}
    store.write_manifest(name, config, layers)
    log.info("created model %s (%d layers)", name.display, len(layers))
    yield {"status": "success"}


def pull_model(store: ModelStore, model: str) -> Iterator[Status]:
    """Import `model` into the own store from the local Ollama store or the bundled models.

    No registry is reachable from this server, so anything else fails fast with PullError (before any status)."""
    name = ModelName.parse(model)
    try:
        entry = store.get(name)
    except ModelNotFoundError:
        entry = None
    if entry is None:
        where = f"the local Ollama store ({store.ollama_root})" if store.ollama_root else "any local store"
        raise PullError(
            f"pull model manifest: cannot reach registry {name.host}: this server has no registry access, "
            f"and '{name.display}' is not in {where}; import a GGUF with `ollama-distributed create`"
        )
    yield {"status": "pulling manifest"}
    if entry.source == "local":
        for layer in entry.layers:
            yield {"status": f"pulling {layer.digest[7:19]}", "digest": layer.digest,
                   "total": layer.size, "completed": layer.size}
        yield {"status": "success"}
        return
    layers: list[Layer] = []
    for layer in entry.layers:
        if entry.source == "bundled":
            src = entry.model_path
        else:
            src = store.blob_path(layer.digest)
            if src is None:
                raise PullError(f"blob {layer.digest} of '{name.display}' is missing from the Ollama store")
        total = src.stat().st_size
        label = f"pulling {layer.digest[7:19]}"
        yield {"status": label, "digest": layer.digest, "total": total, "completed": 0}
        h = hashlib.sha256()
        done = 0
        tmp = store.root / "blobs" / f".pull-{os.getpid()}-{layer.digest[7:]}"
        try:
            os.link(src, tmp)  # same filesystem: no second copy of a multi-GB file; still verified below
            out = None
        except OSError:
            out = open(tmp, "wb")
        with open(src, "rb") as fi:
            for chunk in iter(lambda: fi.read(8 << 20), b""):
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
                done += len(chunk)
                yield {"status": label, "digest": layer.digest, "total": total, "completed": done}
        if out is not None:
            out.close()
        digest = "sha256:" + h.hexdigest()
        yield {"status": "verifying sha256 digest"}
        if entry.source != "bundled" and digest != layer.digest:
            tmp.unlink()
            raise PullError(f"digest mismatch for {layer.digest}: the Ollama store's blob hashes to {digest}")
        target = store.own_blob_path(digest)
        if target.exists():
            tmp.unlink()
        else:
            os.replace(tmp, target)
        layers.append(Layer(layer.media_type, digest, total))
    yield {"status": "writing manifest"}
    store.write_manifest(name, entry.config, layers)
    yield {"status": "success"}
