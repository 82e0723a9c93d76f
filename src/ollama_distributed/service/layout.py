"""Ollama's image layout as data: media types, digests, layers, listed entries and typed store errors.

Sources: ollama/ollama manifest/{manifest,layer,paths}.go and types/model/config.go (checklist §15).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .gguf_info import GGUFSummary
from .names import ModelName

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_PREFIX = "application/vnd.ollama.image."
MODEL_LAYER = LAYER_PREFIX + "model"
TEMPLATE_LAYER = LAYER_PREFIX + "template"
SYSTEM_LAYER = LAYER_PREFIX + "system"
PARAMS_LAYER = LAYER_PREFIX + "params"
MESSAGES_LAYER = LAYER_PREFIX + "messages"
LICENSE_LAYER = LAYER_PREFIX + "license"
PROJECTOR_LAYER = LAYER_PREFIX + "projector"
ADAPTER_LAYER = LAYER_PREFIX + "adapter"

_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


class StoreError(Exception):
    """Base of the store's typed errors; `status` is the HTTP status the API maps it to."""

    status = 500


class ModelNotFoundError(StoreError):
    status = 404

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"model '{name}' not found")


class ReadOnlyModelError(StoreError):
    status = 400


class InvalidDigestError(StoreError):
    status = 400


class BlobNotFoundError(StoreError):
    status = 404


def parse_digest(digest: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` → lower-case hex. Raises InvalidDigestError."""
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise InvalidDigestError(f"invalid digest format {digest!r}: expected sha256:<64 hex digits>")
    return m.group(1).lower()


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class ModelEntry:
    """One listed model.

    source: "local" (own root), "ollama" (read-only Ollama store) or "bundled".
    digest: sha256 hex of the manifest bytes (what `/api/tags` shows, no prefix).
    model_path: the GGUF weights file (a blob, or the bundled file).
    config: the config blob (model_format, model_family, model_type, file_type, ...).
    """

    name: ModelName
    source: str
    manifest: dict[str, Any]
    digest: str
    modified_at: datetime
    size: int
    model_path: Path
    config: dict[str, Any]
    manifest_path: Path | None = None

    @property
    def layers(self) -> list[Layer]:
        return [Layer(l["mediaType"], l["digest"], int(l.get("size", 0))) for l in self.manifest.get("layers", [])]

    def layer(self, media_type: str) -> Layer | None:
        found = [l for l in self.layers if l.media_type == media_type]
        return found[-1] if found else None

    @property
    def details(self) -> dict[str, Any]:
        """`details` of /api/tags, /api/show and /api/ps."""
        c = self.config
        family = c.get("model_family", "")
        return {
            "parent_model": "",
            "format": c.get("model_format", "gguf"),
            "family": family,
            "families": c.get("model_families") or ([family] if family else []),
            "parameter_size": c.get("model_type", ""),
            "quantization_level": c.get("file_type", ""),
        }


def config_from_summary(summary: GGUFSummary) -> dict[str, Any]:
    """The config blob Ollama writes for a GGUF model (types/model/config.go ConfigV2 fields)."""
    arch = summary.architecture
    return {
        "model_format": "gguf",
        "model_family": arch,
        "model_families": [arch] if arch else [],
        "model_type": summary.parameter_size,
        "file_type": summary.file_type,
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
    }
