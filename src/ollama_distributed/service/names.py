"""Ollama model names: `[host/][namespace/]model[:tag]`.

Rules follow ollama/ollama types/model/name.go (`ParseName`, `isValidPart`) as summarised in the conformance
checklist §14:
  - a tag exists only when the last ':' comes after the last '/';
  - defaults: host `registry.ollama.ai`, namespace `library`, tag `latest`;
  - every part starts with a letter, digit or '_' and continues with letters, digits, '_', '-', '.';
    a namespace may not contain '.', only a host may contain ':' (a port); model, namespace and tag are
    1-80 characters, a host 1-350.
Because every part is checked against that alphabet, a valid name can never contain '..' as a part, a path
separator inside a part, or start with '/', so a name maps safely onto `manifests/<host>/<ns>/<model>/<tag>`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_MAX_LEN = {"host": 350, "namespace": 80, "model": 80, "tag": 80}


class InvalidModelNameError(ValueError):
    """A model name that does not follow Ollama's naming rules (HTTP 400 `invalid model name`)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"invalid model name {name!r}: {reason}")


def _is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


def _check_part(kind: str, part: str, full: str) -> None:
    if not 1 <= len(part) <= _MAX_LEN[kind]:
        raise InvalidModelNameError(full, f"{kind} must be 1-{_MAX_LEN[kind]} characters, got {len(part)}")
    if not _is_word_char(part[0]):
        raise InvalidModelNameError(full, f"{kind} {part!r} must start with a letter, digit or '_'")
    for c in part[1:]:
        if _is_word_char(c) or c in "-_":
            continue
        if c == "." and kind != "namespace":
            continue
        if c == ":" and kind == "host":
            continue
        raise InvalidModelNameError(full, f"character {c!r} is not allowed in the {kind} {part!r}")


@dataclass(frozen=True)
class ModelName:
    """A fully qualified, validated model name; build one with `ModelName.parse`."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, name: str) -> "ModelName":
        """Parse and validate; missing parts take Ollama's defaults. Raises InvalidModelNameError."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidModelNameError(str(name), "empty name")
        raw = name.strip()
        if "@" in raw:
            # `model@sha256:...` pins a digest in Ollama; a store lookup by name ignores it.
            raw = raw.split("@", 1)[0]
        tag = DEFAULT_TAG
        colon, slash = raw.rfind(":"), raw.rfind("/")
        if colon > slash:
            raw, tag = raw[:colon], raw[colon + 1 :]
        parts = raw.split("/")
        if len(parts) > 3:
            raise InvalidModelNameError(name, "expected [host/][namespace/]model[:tag]")
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace, model = parts
        elif len(parts) == 2:
            namespace, model = parts
        else:
            (model,) = parts
        for kind, part in (("host", host), ("namespace", namespace), ("model", model), ("tag", tag)):
            _check_part(kind, part, name)
        return cls(host, namespace, model, tag)

    @property
    def display(self) -> str:
        """Shortest form Ollama shows: default host and namespace dropped (`llama3.2:latest`, `user/m:tag`)."""
        if self.host.lower() == DEFAULT_HOST:
            if self.namespace.lower() == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """(host, namespace, model, tag): the four path components of the manifest."""
        return (self.host, self.namespace, self.model, self.tag)

    def key(self) -> tuple[str, str, str, str]:
        """Case-insensitive identity (Ollama looks names up case-insensitively)."""
        return tuple(p.lower() for p in self.parts)  # type: ignore[return-value]

    def __str__(self) -> str:
        return self.display


def parse_name(name: str) -> ModelName:
    """Shorthand for `ModelName.parse`."""
    return ModelName.parse(name)
