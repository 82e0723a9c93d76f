"""Decode of a mixture-of-experts model reads only the chosen experts: step time vs dense models of the same total
and of the same active FFN width (issue 14).

Three random GGUFs in one type (default Q8_0, kept in it: `--dtype auto`), same attention and vocabulary:
  moe:          n_expert experts of width F, top-k          (total FFN n·F columns, active k·F)
  dense-active: one dense FFN of k·F columns                (what a token computes in the MoE)
  dense-total:  one dense FFN of n·F columns                (what the MoE holds)
If decode reads only the chosen experts, the MoE step is near dense-active's (plus routing and k small GEMVs) and far
below dense-total's. Best of N single-sequence decode steps, variants interleaved round by round (a loaded machine
hits each alike); read the ratios, not the absolute numbers.

    python bench/moe_bench.py [--layers 8 --hidden 1024 --experts 64 --used 8 --expert-ffn 256 --dtype q8_0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ollama_distributed.model.transformer import ModelShard  # noqa: E402
from tests.helpers.tiny_gguf import write_tiny_llama_gguf, write_tiny_qwen3moe_gguf  # noqa: E402


def step_ms(shard: ModelShard, rounds: int) -> list[float]:
    cache = shard.new_cache(rounds + 16)
    shard.forward(torch.tensor([5, 6, 7, 8]), [0], [4], cache)
    out, tok = [], torch.tensor([9])
    for _ in range(rounds):
        t0 = time.perf_counter()
        logits = shard.forward(tok, [0], [1], cache)
        out.append((time.perf_counter() - t0) * 1e3)
        tok = logits.argmax(-1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--used", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=256)
    ap.add_argument("--dtype", default="q8_0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    heads, hd = a.hidden // 128, 128
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(n_layers=a.layers, hidden=a.hidden, n_heads=heads, n_kv_heads=max(1, heads // 4), vocab=4096,
                      dtype=a.dtype)
        files = {
            "moe": write_tiny_qwen3moe_gguf(Path(tmp) / "moe.gguf", head_dim=hd, n_expert=a.experts,
                                            n_expert_used=a.used, expert_ffn=a.expert_ffn, **common),
            "dense-active": write_tiny_llama_gguf(Path(tmp) / "da.gguf", head_dim=hd, ffn=a.used * a.expert_ffn,
                                                  **common),
            "dense-total": write_tiny_llama_gguf(Path(tmp) / "dt.gguf", head_dim=hd, ffn=a.experts * a.expert_ffn,
                                                 **common),
        }
        shards = {k: ModelShard.from_file(p, quant="native") for k, p in files.items()}
        best = {k: float("inf") for k in shards}
        for _ in range(a.rounds):
            for k, s in shards.items():
                best[k] = min(best[k], min(step_ms(s, a.steps)))
    print(f"{a.layers} layers, hidden {a.hidden}, {a.experts} experts of {a.expert_ffn} (top-{a.used}), {a.dtype}, "
          f"{torch.get_num_threads()} threads")
    for k, s in shards.items():
        print(f"  {k:13s} {s.weight_bytes() / 1e6:8.1f} MB held   decode step {best[k]:7.2f} ms")
    print(f"  moe / dense-active = {best['moe'] / best['dense-active']:.2f}, "
          f"moe / dense-total = {best['moe'] / best['dense-total']:.2f}")


if __name__ == "__main__":
    main()
