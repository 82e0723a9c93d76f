"""Peak memory of loading a shard of SmolLM2-135M: does it scale with the shard's share of the model?

Each measurement runs in a fresh subprocess (so peaks do not mix) which imports everything, reads the config
(parses the GGUF header), records its RSS, then builds a ModelShard for one ShardSpec and reports the peak RSS
(resource.getrusage ru_maxrss) and the bytes of the tensors it holds. "Load peak" = peak − RSS before loading;
it includes transient dequantisation buffers and the memory-mapped file pages the shard touched.

    python bench/shard_memory.py [--dtype float32|bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

CASES = [
    # name, layers, kv_heads, ffn, has_embedding, has_output
    ("full model", (0, 30), (0, 3), (0, 1536), True, True),
    ("PP 1/2: layers 0-15 + embed", (0, 15), (0, 3), (0, 1536), True, False),
    ("PP 1/2: layers 15-30 + head", (15, 30), (0, 3), (0, 1536), False, True),
    ("PP 1/3: layers 10-20 (middle)", (10, 20), (0, 3), (0, 1536), False, False),
    ("PP 1/2 layers only: 0-15", (0, 15), (0, 3), (0, 1536), False, False),
    ("TP 1/3: 1 KV group, FFN 512", (0, 30), (0, 1), (0, 512), False, False),
    ("TP 2/3: 2 KV groups, FFN 1024", (0, 30), (0, 2), (0, 1024), False, False),
    ("no layers: embed + head only", (30, 30), (0, 3), (0, 1536), True, True),
]


def rss_now_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(spec_args: list[str], dtype_name: str) -> None:
    import torch

    from ollama_distributed.model.bundled import bundled_model_path
    from ollama_distributed.model.shard import ShardSpec
    from ollama_distributed.model.transformer import ModelShard
    from ollama_distributed.model.weights import load_weights, read_config

    path = bundled_model_path("smollm2:135m")
    cfg = read_config(path)
    l0, l1, k0, k1, f0, f1, emb, out = (int(a) for a in spec_args)
    spec = ShardSpec((l0, l1), (k0, k1), (f0, f1), bool(emb), bool(out))
    before = rss_now_kib()
    shard = ModelShard(cfg, spec, load_weights(path, cfg, spec, getattr(torch, dtype_name)))
    seen: set[int] = set()
    held = 0
    tensors = [shard.embed, shard.norm, shard.lm_head] + [t for layer in shard.layers for t in vars(layer).values()]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            held += t.numel() * t.element_size()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"before_kib": before, "peak_kib": peak, "held_bytes": held}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=8, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dtype)
        return
    results = []
    for name, layers, kv, ffn, emb, out in CASES:
        argv = [str(v) for v in (*layers, *kv, *ffn, int(emb), int(out))]
        proc = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--child", *argv],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({"case": name, **r})
    full = results[0]
    full_load = full["peak_kib"] - full["before_kib"]
    print(f"SmolLM2-135M Q4_1 GGUF → {args.dtype}; one subprocess per row; MiB = 2^20 bytes")
    print(f"{'shard':<32}{'held MiB':>10}{'share':>8}{'load peak MiB':>15}{'share':>8}{'peak RSS MiB':>14}")
    for r in results:
        load = r["peak_kib"] - r["before_kib"]
        print(f"{r['case']:<32}{r['held_bytes'] / 2**20:>10.1f}{r['held_bytes'] / full['held_bytes']:>8.2f}"
              f"{load / 1024:>15.1f}{load / full_load:>8.2f}{r['peak_kib'] / 1024:>14.1f}")
    print(f"(RSS before loading, after imports + config read: ~{full['before_kib'] / 1024:.0f} MiB in every row)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
