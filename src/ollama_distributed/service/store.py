"""Model store in Ollama's on-disk layout: manifests + content-addressed blobs.

Layout (ollama/ollama manifest/{manifest,layer,paths}.go, checklist §15):
  <root>/manifests/<host>/<namespace>/<model>/<tag>   JSON image manifest (schemaVersion 2)
  <root>/blobs/sha256-<hex>                            layer and config blobs
Three sources are merged, first wins on a name clash:
  1. our own writable root (OLLAMA_DISTRIBUTED_MODELS, default ~/.ollama-distributed/models);
  2. an existing Ollama store, read-only (OLLAMA_MODELS or ~/.ollama/models), so a user's pulled models are
     listed without copying; its blobs are also used to resolve layers of our own manifests (a `cp` of an Ollama
     model writes only a manifest);
  3. bundled models (model/bundled.py), shown with a synthetic manifest built from the GGUF header.
Writes (create, copy, delete, blob upload) only ever touch the own root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from ..model.bundled import available_bundled_models
from .gguf_info import GGUFSummary, read_gguf_summary
from .names import ModelName

log = logging.getLogger(__name__)

from .layout import (  # noqa: F401 - re-exported: the store's public vocabulary
    ADAPTER_LAYER, CONFIG_MEDIA_TYPE, LAYER_PREFIX, LICENSE_LAYER, MANIFEST_MEDIA_TYPE, MESSAGES_LAYER, MODEL_LAYER,
    PARAMS_LAYER, PROJECTOR_LAYER, SYSTEM_LAYER, TEMPLATE_LAYER, BlobNotFoundError, InvalidDigestError, Layer,
    ModelEntry, ModelNotFoundError, ReadOnlyModelError, StoreError, config_from_summary, parse_digest,
)


class ModelStore:
    """Thread-safe access to the merged stores. Names are validated `ModelName`s; lookups are case-insensitive."""

    def __init__(self, root: Path, ollama_root: Path | None = None, include_bundled: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.ollama_root = Path(ollama_root).expanduser() if ollama_root else None
        if self.ollama_root is not None and self.ollama_root.resolve() == self.root.resolve():
            self.ollama_root = None  # the same directory twice would list every model twice
        self.include_bundled = include_bundled
        (self.root / "manifests").mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._summaries: dict[tuple[str, int, int], GGUFSummary] = {}

    # ---- blobs ---------------------------------------------------------------------------------------------------

    def own_blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / f"sha256-{parse_digest(digest)}"

    def blob_path(self, digest: str) -> Path | None:
        """Where a blob lives: own root first, then the Ollama store; None if in neither."""
        hexd = parse_digest(digest)
        for root in (self.root, self.ollama_root):
            if root is not None:
                p = root / "blobs" / f"sha256-{hexd}"
                if p.is_file():
                    return p
        return None

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest) is not None

    def write_blob(self, digest: str, chunks: Iterable[bytes]) -> bool:
        """Store a blob from a byte stream, verifying its sha256 while writing. True if newly created.

        Raises InvalidDigestError on a mismatch (nothing is kept)."""
        hexd = parse_digest(digest)
        target = self.own_blob_path(digest)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.root / "blobs", prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != hexd:
                raise InvalidDigestError(f"digest mismatch: expected sha256:{hexd}, got sha256:{h.hexdigest()}")
            if target.exists():
                return False
            os.replace(tmp, target)
            tmp = ""
            return True
        finally:
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)

    def adopt_blob_file(self, digest: str, tmp: Path) -> bool:
        """Move an uploaded temp file into the store after verifying its sha256 (the file is consumed either
        way). True if newly created; InvalidDigestError on a mismatch."""
        hexd = parse_digest(digest)
        try:
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != hexd:
                raise InvalidDigestError(f"digest mismatch: expected sha256:{hexd}, got sha256:{h.hexdigest()}")
            target = self.own_blob_path(digest)
            if target.exists():
                return False
            os.replace(tmp, target)
            return True
        finally:
            if tmp.exists():
                tmp.unlink()

    def new_upload_path(self) -> Path:
        """A fresh temp file inside the blob directory (same filesystem, so adopting it is a rename)."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "blobs", prefix=".upload-")
        os.close(fd)
        return Path(tmp)

    def add_blob_bytes(self, data: bytes) -> Layer:
        """Store small content (template, params JSON, ...) and return its digest and size (media type blank)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.own_blob_path(digest).exists():
            self.write_blob(digest, [data])
        return Layer("", digest, len(data))

    def read_blob_text(self, digest: str) -> str:
        path = self.blob_path(digest)
        if path is None:
            raise BlobNotFoundError(f"blob {digest} is missing from the store")
        return path.read_text(encoding="utf-8")

    def gguf_summary(self, path: Path) -> GGUFSummary:
        """Header summary of a GGUF file (cached by path, size and mtime)."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._summaries.get(key)
        if cached is None:
            cached = read_gguf_summary(path)
            with self._lock:
                self._summaries[key] = cached
        return cached

    # ---- manifests -----------------------------------------------------------------------------------------------

    def _manifest_path(self, root: Path, name: ModelName) -> Path:
        return root.joinpath("manifests", *name.parts)

    def _iter_manifests(self, root: Path) -> Iterable[tuple[ModelName, Path]]:
        base = root / "manifests"
        if not base.is_dir():
            return
        # Exactly four levels: host/namespace/model/tag (checklist §15).
        for path in base.glob("*/*/*/*"):
            if not path.is_file() or path.name.startswith("."):
                continue
            host, ns, model, tag = path.relative_to(base).parts
            try:
                name = ModelName.parse(f"{host}/{ns}/{model}:{tag}")
            except ValueError:
                log.warning("skipping manifest with an invalid name: %s", path)
                continue
            yield name, path

    def _load_manifest(self, name: ModelName, path: Path, source: str) -> ModelEntry | None:
        try:
            raw = path.read_bytes()
            manifest = json.loads(raw)
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable manifest %s: %s", path, exc)
            return None
        config: dict[str, Any] = {}
        cfg_ref = manifest.get("config") or {}
        try:
            if cfg_ref.get("digest"):
                cfg_path = self.blob_path(cfg_ref["digest"])
                if cfg_path is not None:
                    config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, StoreError) as exc:
            log.warning("config blob of %s unreadable: %s", name, exc)
        if config.get("remote_host"):
            return None  # an Ollama cloud stub has no weights here (checklist §15)
        model_layers = [l for l in manifest.get("layers", []) if l.get("mediaType") == MODEL_LAYER]
        if not model_layers:
            return None
        try:
            model_path = self.blob_path(model_layers[0]["digest"])
        except StoreError:
            model_path = None
        if model_path is None:
            log.warning("model %s: weights blob %s is missing; not listed", name, model_layers[0].get("digest"))
            return None
        size = int(cfg_ref.get("size", 0)) + sum(int(l.get("size", 0)) for l in manifest.get("layers", []))
        return ModelEntry(
            name=name, source=source, manifest=manifest, digest=hashlib.sha256(raw).hexdigest(),
            modified_at=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc), size=size,
            model_path=model_path, config=config, manifest_path=path,
        )

    def _bundled_entries(self) -> list[ModelEntry]:
        out = []
        for display, path in available_bundled_models().items():
            name = ModelName.parse(display)
            try:
                summary = self.gguf_summary(path)
            except ValueError as exc:
                log.warning("bundled model %s unreadable: %s", display, exc)
                continue
            st = path.stat()
            # A synthetic manifest: the layer digest names the file's identity, not its hash (hashing 100 MB on
            # every listing is not worth it); `cp`/`pull` of a bundled model stores the real hashed blob.
            identity = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
            manifest = {
                "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": "", "size": 0},
                "layers": [{"mediaType": MODEL_LAYER, "digest": f"sha256:{identity}", "size": st.st_size}],
            }
            raw = json.dumps(manifest, sort_keys=True).encode()
            out.append(ModelEntry(
                name=name, source="bundled", manifest=manifest, digest=hashlib.sha256(raw).hexdigest(),
                modified_at=datetime.fromtimestamp(st.st_mtime, timezone.utc), size=st.st_size,
                model_path=path, config=config_from_summary(summary),
            ))
        return out

    def list(self) -> list[ModelEntry]:
        """Every usable model, newest first, each name once (own root > Ollama store > bundled)."""
        seen: dict[tuple[str, ...], ModelEntry] = {}
        sources: list[tuple[str, Path | None]] = [("local", self.root), ("ollama", self.ollama_root)]
        for source, root in sources:
            if root is None:
                continue
            for name, path in self._iter_manifests(root):
                if name.key() in seen:
                    continue
                entry = self._load_manifest(name, path, source)
                if entry is not None:
                    seen[name.key()] = entry
        if self.include_bundled:
            for entry in self._bundled_entries():
                seen.setdefault(entry.name.key(), entry)
        return sorted(seen.values(), key=lambda e: e.modified_at, reverse=True)

    def get(self, name: ModelName | str) -> ModelEntry:
        """The model of that name (case-insensitive). Raises InvalidModelNameError / ModelNotFoundError."""
        if isinstance(name, str):
            name = ModelName.parse(name)
        for source, root in (("local", self.root), ("ollama", self.ollama_root)):
            if root is None:
                continue
            path = self._manifest_path(root, name)
            candidates = [(name, path)] if path.is_file() else [
                (n, p) for n, p in self._iter_manifests(root) if n.key() == name.key()
            ]
            for n, p in candidates:
                entry = self._load_manifest(n, p, source)
                if entry is not None:
                    return entry
        if self.include_bundled:
            for entry in self._bundled_entries():
                if entry.name.key() == name.key():
                    return entry
        raise ModelNotFoundError(name.display)

    def write_manifest(self, name: ModelName, config: dict[str, Any], layers: list[Layer]) -> Path:
        """Write config blob + manifest for `name` in the own root (atomically replacing an older one)."""
        cfg_layer = self.add_blob_bytes(json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": cfg_layer.digest, "size": cfg_layer.size},
            "layers": [l.to_json() for l in layers],
        }
        path = self._manifest_path(self.root, name)
        with self._lock:
            # A name that differs only in case replaces the existing manifest (lookups are case-insensitive).
            for other, p in list(self._iter_manifests(self.root)):
                if other.key() == name.key() and p != path:
                    p.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(json.dumps(manifest).encode())
            os.replace(tmp, path)
        return path

    # ---- copy / delete -------------------------------------------------------------------------------------------

    def ensure_local_blob(self, entry: ModelEntry) -> Layer:
        """The weights layer of `entry`, guaranteeing the blob is addressable from our store (a bundled model's
        file is hashed and hard-linked or copied in)."""
        layer = entry.layer(MODEL_LAYER)
        assert layer is not None
        if entry.source != "bundled":
            return layer
        h = hashlib.sha256()
        with open(entry.model_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        target = self.own_blob_path(digest)
        if not target.exists():
            link_or_copy(entry.model_path, target)
        return Layer(MODEL_LAYER, digest, entry.model_path.stat().st_size)

    def copy(self, source: str, destination: str) -> ModelEntry:
        """`/api/copy`: a new manifest with the same layers. Raises ModelNotFoundError, InvalidModelNameError."""
        dst = ModelName.parse(destination)
        entry = self.get(source)
        layers = [self.ensure_local_blob(entry) if l.media_type == MODEL_LAYER else l for l in entry.layers]
        self.write_manifest(dst, entry.config, layers)
        return self.get(dst)

    def delete(self, name: str) -> None:
        """Remove a model from the own root and prune blobs no other own manifest uses."""
        parsed = ModelName.parse(name)
        entry = self.get(parsed)
        if entry.source != "local":
            where = "bundled with the package" if entry.source == "bundled" else f"in the Ollama store {self.ollama_root}"
            raise ReadOnlyModelError(f"model '{entry.name.display}' is {where}, which this server does not modify")
        with self._lock:
            assert entry.manifest_path is not None
            entry.manifest_path.unlink()
            used: set[str] = set()
            for _, path in self._iter_manifests(self.root):
                try:
                    m = json.loads(path.read_bytes())
                except (OSError, ValueError):
                    continue
                used.update(l.get("digest", "") for l in m.get("layers", []))
                used.add((m.get("config") or {}).get("digest", ""))
            mine = [l.digest for l in entry.layers] + [(entry.manifest.get("config") or {}).get("digest", "")]
            for digest in mine:
                if digest and digest not in used:
                    p = self.own_blob_path(digest)
                    if p.exists():
                        p.unlink()
            # Drop now-empty manifest directories so the tree does not accumulate husks.
            d = entry.manifest_path.parent
            while d != self.root / "manifests" and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
                d = d.parent


def link_or_copy(src: Path, dst: Path, progress: Any = None) -> None:
    """Hard-link `src` to `dst` when on the same filesystem, else copy in chunks (calling progress(n_bytes))."""
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        os.link(src, tmp)
        if progress:
            progress(src.stat().st_size)
    except OSError:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            for chunk in iter(lambda: fi.read(4 << 20), b""):
                fo.write(chunk)
                if progress:
                    progress(len(chunk))
    os.replace(tmp, dst)
