"""Typed errors of the model layer.

A user points the server at a file; when that file cannot be used the message must say which file and why
(never a bare numpy/struct traceback), so the API layer can turn it into a clear 4xx/5xx.
"""

from __future__ import annotations

from pathlib import Path


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupt or not a GGUF/HF model. The message names file and problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # rebuilt from its own arguments: a shard worker's error crosses Ray pickled
        return ModelFileError, (self.path, self.problem)


class UnsupportedArchitectureError(ModelFileError):
    """The file is a valid model, but of an architecture the engine does not implement."""

    def __init__(self, path: str | Path, architecture: str, supported: tuple[str, ...]) -> None:
        self.architecture = architecture
        self.supported = tuple(supported)
        super().__init__(
            path, f"unsupported model architecture {architecture!r} (supported: {', '.join(supported)})"
        )

    def __reduce__(self):
        return UnsupportedArchitectureError, (self.path, self.architecture, self.supported)


class ContextLengthError(ValueError):
    """A sequence would grow past the KV cache's max_seq_len (num_ctx); the message carries the numbers."""
