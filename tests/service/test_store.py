"""The Ollama-layout model store: own root + read-only Ollama store + bundled models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ollama_distributed.model.errors import ModelFileError
from ollama_distributed.service.creator import CreateError, PullError, create_model, pull_model
from ollama_distributed.service.names import InvalidModelNameError
from ollama_distributed.service.store import (
    InvalidDigestError, ModelNotFoundError, ModelStore, ReadOnlyModelError,
)
from tests.api.conftest import write_ollama_store


@pytest.fixture
def store(tmp_path: Path, tiny_gguf: Path) -> ModelStore:
    ollama_root = tmp_path / "ollama"
    write_ollama_store(ollama_root, tiny_gguf, ("registry.ollama.ai", "library", "theirs", "latest"))
    return ModelStore(tmp_path / "ours", ollama_root, include_bundled=True)


def test_create_layout_and_listing(store: ModelStore, tiny_gguf: Path) -> None:
    statuses = [s["status"] for s in create_model(store, "Mine:v1", from_=str(tiny_gguf), system="hi",
                                                  parameters={"temperature": 0.1})]
    assert statuses[0] == "parsing GGUF" and statuses[-1] == "success"
    manifest = store.root / "manifests" / "registry.ollama.ai" / "library" / "Mine" / "v1"
    m = json.loads(manifest.read_text())
    assert m["schemaVersion"] == 2 and m["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    model_layer = next(l for l in m["layers"] if l["mediaType"] == "application/vnd.ollama.image.model")
    assert model_layer["digest"] == f"sha256:{digest}"
    assert (store.root / "blobs" / f"sha256-{digest}").is_file()
    config = json.loads((store.root / "blobs" / f"sha256-{m['config']['digest'][7:]}").read_text())
    assert config["model_format"] == "gguf" and config["model_family"] == "llama" and config["file_type"] == "F32"

    entries = store.list()
    names = [e.name.display for e in entries]
    assert names[0] == "Mine:v1"  # newest first
    assert {"Mine:v1", "theirs:latest", "smollm2:135m"} <= set(names)
    entry = store.get("mine:V1")  # case-insensitive
    assert entry.source == "local" and entry.digest == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert entry.size == sum(l["size"] for l in m["layers"]) + m["config"]["size"]
    assert store.get("theirs").source == "ollama" and store.get("smollm2:135m").source == "bundled"


def test_copy_delete_prune(store: ModelStore, tiny_gguf: Path) -> None:
    list(create_model(store, "a", from_=str(tiny_gguf)))
    store.copy("a", "b")
    blob = store.blob_path(store.get("a").layer("application/vnd.ollama.image.model").digest)
    store.delete("a")
    assert blob.exists()  # still used by b
    store.delete("b")
    assert not blob.exists()
    assert not (store.root / "manifests" / "registry.ollama.ai").exists()  # no empty husks
    with pytest.raises(ModelNotFoundError):
        store.delete("b")
    with pytest.raises(ReadOnlyModelError):
        store.delete("theirs")
    with pytest.raises(ReadOnlyModelError):
        store.delete("smollm2:135m")
    # Copying a read-only model writes only a manifest; its blob is resolved from the Ollama store.
    store.copy("theirs", "mine")
    assert store.get("mine").model_path.parent == store.ollama_root / "blobs"
    with pytest.raises(InvalidModelNameError):
        store.copy("theirs", "../../x")


def test_blobs(store: ModelStore) -> None:
    data = b"hello"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.write_blob(digest, [data[:2], data[2:]]) is True
    assert store.write_blob(digest, [data]) is False
    assert store.has_blob(digest) and store.has_blob(digest.replace(":", "-"))
    with pytest.raises(InvalidDigestError, match="mismatch"):
        store.write_blob("sha256:" + "0" * 64, [data])
    assert not list((store.root / "blobs").glob(".upload-*"))  # no temp files left behind
    for bad in ("sha256:xyz", "md5:" + "0" * 64, "sha256:" + "0" * 63, "../../etc/passwd"):
        with pytest.raises(InvalidDigestError):
            store.has_blob(bad)


def test_create_errors(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        list(create_model(store, "x", from_="no-such-model"))
    with pytest.raises(ModelFileError, match="no such file"):
        list(create_model(store, "x", from_=str(tmp_path / "nope.gguf")))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 32)
    with pytest.raises(ModelFileError):
        list(create_model(store, "x", from_=str(bad)))
    with pytest.raises(CreateError, match="neither"):
        list(create_model(store, "x"))
    with pytest.raises(CreateError, match="not been uploaded"):
        list(create_model(store, "x", files={"m.gguf": "sha256:" + "1" * 64}))
    assert all(e.name.display != "x:latest" for e in store.list())


def test_pull(store: ModelStore) -> None:
    out = list(pull_model(store, "theirs"))
    assert out[0]["status"] == "pulling manifest" and out[-1]["status"] == "success"
    assert store.get("theirs").source == "local"
    with pytest.raises(PullError, match="cannot reach registry"):
        list(pull_model(store, "llama3"))
