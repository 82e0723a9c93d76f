"""Where decode time goes on SmolLM2-135M, and aggregate decode throughput under concurrency.

Two measurements (numbers and method are written up in bench/README.md):

  concurrency  aggregate decode tokens/s with C = 1/4/8/16 concurrent requests through the real
               InferenceEngine + LocalExecutor (greedy, eos ignored so every request decodes exactly N tokens).
               Decode time is the wall time from the moment every request has its first token to the last token,
               so prefill is excluded; best of --rounds.
  batch        model-level decode step for B = 1/4/8/16 sequences of different lengths: per-sequence vs batched
               attention (ModelShard.batched_decode), interleaved.
  profile      one decode token split into weight reads (bytes/token over measured GEMV bandwidth of the dtype),
               attention (SDPA over the cache), per-op dispatch overhead (ops/token x cost of a tiny op) and
               sampling (argmax / full sampler over the vocab).
  formats      bf16 and int4 (4-bit layers, int8 head) vs fp32: decode step time and accuracy vs fp32.

    python bench/decode_profile.py concurrency [--dtype fp32] [--tokens 48] [--rounds 2] [--ab | --amx-ab]
    python bench/decode_profile.py batch [--dtype fp32] [--context 256] [--rounds 3]
    python bench/decode_profile.py profile [--dtype fp32] [--context 64]
    python bench/decode_profile.py formats [--tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

DTYPES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int4": (torch.bfloat16, "int4"),
          "auto": (torch.float32, "native")}  # auto: the file's own types (--dtype auto)


def _best(fn, n: int) -> float:
    """Best-of-n wall time of fn() in seconds (other processes share this machine; the minimum is the signal)."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def concurrency(args: argparse.Namespace) -> None:
    from ollama_distributed.model.bundled import bundled_model_path
    from ollama_distributed.model.options import GenerationOptions
    from ollama_distributed.model.tokenizer import Tokenizer
    from ollama_distributed.runtime.engine import GenerationRequest, InferenceEngine
    from ollama_distributed.runtime.local_executor import LocalExecutor

    path = bundled_model_path("smollm2:135m")
    tok = Tokenizer.from_gguf(path)
    eng = InferenceEngine(LocalExecutor(path, *DTYPES[args.dtype][:1], max_seq_len=1024, quant=DTYPES[args.dtype][1]), tok, max_batch=16)
    eng.eos_ids = frozenset()  # decode exactly num_predict tokens per request
    prompts = [tok.encode(f"Request {i}: write a short story about the number {i * 7}.") for i in range(16)]
    opts = GenerationOptions(temperature=0.0, num_predict=args.tokens)
    shard = eng.executor.shard
    variants = {"per-seq attn": False, "batched attn": True} if args.ab else {"current": shard.batched_decode}
    ops = None
    if args.amx_ab:  # the native kernels' AMX tiles for batches off / on (native_kernels.cpp amx_blocks)
        from ollama_distributed.model import cpu_kernels

        ops = cpu_kernels.native_ops()
        if ops is None or not hasattr(ops, "use_amx"):
            raise SystemExit("--amx-ab: these kernels have no AMX switch")
        variants = {"AMX off": False, "AMX on": True}
    results: dict[tuple[str, int], float] = {}
    for c in args.conc:
        # variants interleaved round by round, so load spikes from other processes hit both alike
        for _, (name, flag) in itertools.product(range(args.rounds), variants.items()):
            if ops is not None:
                ops.use_amx(flag)
            else:
                shard.batched_decode = flag
            firsts: list[float] = []
            lock = threading.Lock()

            def run(i: int) -> None:
                h = eng.submit(GenerationRequest(prompts[i], opts))
                n = 0
                for ch in h:
                    if ch.token_ids and n == 0:
                        with lock:
                            firsts.append(time.perf_counter())
                    n += len(ch.token_ids)
                assert n == args.tokens, n

            threads = [threading.Thread(target=run, args=(i,)) for i in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            end = time.perf_counter()
            # tokens decoded after the last request got its first token: (tokens - 1) each, all running together
            tps = c * (args.tokens - 1) / (end - max(firsts))
            results[(name, c)] = max(results.get((name, c), 0.0), tps)
            print(f"  {name} C={c:>2}: {tps:7.1f} aggregate decode tok/s", file=sys.stderr, flush=True)
    eng.close()
    print(f"load avg {os.getloadavg()[0]:.1f}; dtype {args.dtype}; {args.tokens} tokens/request; best of {args.rounds}")
    for name in variants:
        base = results[(name, args.conc[0])]
        for c in args.conc:
            v = results[(name, c)]
            print(f"{name:<14} C={c:>2}  {v:8.1f} tok/s  {v / base:5.2f}x C={args.conc[0]}")


def profile(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    from ollama_distributed.model.bundled import bundled_model_path
    from ollama_distributed.model.sampling import Sampler, sample_batch
    from ollama_distributed.model.options import GenerationOptions
    from ollama_distributed.model.quant import linear, weight_tensors
    from ollama_distributed.model.transformer import ModelShard

    dtype, quant = DTYPES[args.dtype]
    shard = ModelShard.from_file(bundled_model_path("smollm2:135m"), dtype=dtype, quant=quant)
    cfg = shard.cfg
    # 1. weights read per decode token: every layer matrix + lm_head (embedding row read is negligible)
    layer_bytes = sum(t.nbytes for l in shard.layers for w in (l.wqkv, l.wo, l.wgu, l.wdown) for t in weight_tensors(w))
    head_bytes = sum(t.nbytes for t in weight_tensors(shard.lm_head))
    total_bytes = layer_bytes + head_bytes
    # GEMV bandwidth: one (1, hidden) x (ffn*2, hidden)^T product per the biggest layer matrix, and the lm_head
    x = torch.randn(1, cfg.hidden_size, dtype=dtype)
    w = shard.layers[0].wgu
    t_gu = _best(lambda: [linear(x, w) for _ in range(50)], 5) / 50
    t_head = _best(lambda: [linear(x, shard.lm_head) for _ in range(5)], 5) / 5
    bw_layer, bw_head = sum(t.nbytes for t in weight_tensors(w)) / t_gu / 1e9, head_bytes / t_head / 1e9
    t_weights = layer_bytes / (bw_layer * 1e9) + t_head
    # 2. attention at this context length (one SDPA per layer, GQA as grouped queries)
    kv, g, hd, T = shard.n_kv, shard.n_heads // shard.n_kv, cfg.head_dim, args.context
    q, k, v = torch.randn(kv, g, hd, dtype=dtype), torch.randn(kv, T, hd, dtype=dtype), torch.randn(kv, T, hd, dtype=dtype)
    t_attn = _best(lambda: [F.scaled_dot_product_attention(q, k, v) for _ in range(100)], 5) / 100 * len(shard.layers)
    # 3. dispatch: count aten ops in one decode step, times the cost of a tiny op
    cache = shard.new_cache(T + 8)
    shard.forward(torch.arange(T), [0], [T], cache)
    from torch.profiler import ProfilerActivity, profile as tprof

    with tprof(activities=[ProfilerActivity.CPU]) as prof:
        shard.forward(torch.tensor([1]), [0], [1], cache)
    n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    top_ops = sum(1 for e in prof.events() if e.cpu_parent is None)
    small = torch.randn(8)
    t_op = _best(lambda: [torch.add(small, small) for _ in range(1000)], 5) / 1000
    # 4. sampling
    logits = torch.randn(1, cfg.vocab_size)
    t_argmax = _best(lambda: [logits.argmax(-1) for _ in range(100)], 5) / 100
    s = Sampler(GenerationOptions(temperature=0.8, top_k=40, top_p=0.9, seed=1))
    hist = [list(range(64))]
    t_sample = _best(lambda: [sample_batch(logits, [s], hist) for _ in range(20)], 5) / 20
    # fused vs separate projections (one layer): what fusing q/k/v and gate/up saves per token (dense only)
    l0 = shard.layers[0]
    fused = separate = float("nan")
    if quant is None:
        parts_qkv = [t.contiguous() for t in l0.wqkv.split([shard.q_dim, shard.kv_dim, shard.kv_dim])]
        parts_gu = [t.contiguous() for t in l0.wgu.split(shard.ffn_local)]
        xn = torch.randn(1, cfg.hidden_size, dtype=dtype)
        fused = _best(lambda: [(F.linear(xn, l0.wqkv), F.linear(xn, l0.wgu)) for _ in range(50)], 5) / 50
        separate = _best(lambda: [[F.linear(xn, w) for w in parts_qkv + parts_gu] for _ in range(50)], 5) / 50
    # whole step, measured
    cache2 = shard.new_cache(T + 64)
    shard.forward(torch.arange(T), [0], [T], cache2)
    tok = torch.tensor([1])
    t_step = _best(lambda: shard.forward(tok, [0], [1], cache2), 30)
    print(f"machine load avg {os.getloadavg()[0]:.1f}; dtype {args.dtype}; context {T}; threads {torch.get_num_threads()}")
    print(f"weights read/token  {total_bytes / 1e6:7.1f} MB  (layers {layer_bytes / 1e6:.1f} MB @ {bw_layer:.1f} GB/s, "
          f"lm_head {head_bytes / 1e6:.1f} MB @ {bw_head:.1f} GB/s)  -> {t_weights * 1e3:6.2f} ms")
    print(f"attention (SDPA x {len(shard.layers)} layers)                         -> {t_attn * 1e3:6.2f} ms")
    print(f"dispatch: {n_ops} aten ops ({top_ops} top-level) x {t_op * 1e6:.1f} us           -> {top_ops * t_op * 1e3:6.2f} ms")
    print(f"sampling: argmax {t_argmax * 1e3:.3f} ms, full sampler (top_k/top_p/temp) {t_sample * 1e3:.2f} ms")
    print(f"fused qkv + gate/up: {fused * 1e6:.0f} us/layer vs separate q,k,v,gate,up {separate * 1e6:.0f} us/layer "
          f"-> {(separate - fused) * len(shard.layers) * 1e3:.2f} ms/token saved")
    print(f"measured decode step (best of 30)                                -> {t_step * 1e3:6.2f} ms "
          f"({1 / t_step:.1f} tok/s)")


def batch(args: argparse.Namespace) -> None:
    """Model-level decode step time for B sequences of different lengths, per-sequence vs batched attention
    (interleaved, best of --rounds x 10 steps): isolates the attention change from engine/sampling costs."""
    from ollama_distributed.model.bundled import bundled_model_path
    from ollama_distributed.model.transformer import ModelShard

    dtype, quant = DTYPES[args.dtype]
    shard = ModelShard.from_file(bundled_model_path("smollm2:135m"), dtype=dtype, quant=quant)
    g = torch.Generator().manual_seed(0)
    res: dict[tuple[int, bool], float] = {}
    for b in args.conc:
        lengths = [int(x) for x in torch.randint(16, 2 * args.context, (b,), generator=g)]
        prompts = torch.randint(0, shard.cfg.vocab_size, (sum(lengths),), generator=g)
        sids, one = list(range(b)), torch.ones(b, dtype=torch.int64)
        for _ in range(args.rounds):
            for batched in (False, True):
                shard.batched_decode = batched
                cache = shard.new_cache(4 * args.context)
                shard.forward(prompts, sids, lengths, cache)
                shard.forward(one, sids, [1] * b, cache)
                t = _best(lambda: shard.forward(one, sids, [1] * b, cache), 10)
                res[(b, batched)] = min(res.get((b, batched), 1e9), t)
    print(f"load avg {os.getloadavg()[0]:.1f}; dtype {args.dtype}; cache lengths uniform in [16, {2 * args.context})")
    print(f"{'B':>3}{'per-seq ms':>12}{'batched ms':>12}{'speedup':>9}{'per-seq tok/s':>15}{'batched tok/s':>15}")
    for b in args.conc:
        a, n = res[(b, False)], res[(b, True)]
        print(f"{b:>3}{a * 1e3:>12.2f}{n * 1e3:>12.2f}{a / n:>8.2f}x{b / a:>15.1f}{b / n:>15.1f}")


PROMPTS = [
    "The capital of France is", "Why is the sky blue?", "Write a haiku about autumn.", "def fibonacci(n):",
    "1, 2, 3, 5, 8, 13,", "Translate to German: good morning", "The three laws of motion are",
    "Once upon a time, in a small village,", "SELECT name FROM users WHERE", "The best way to learn a language is",
    "Photosynthesis converts", "In 1969, the first humans", "A list of prime numbers: 2, 3, 5,",
    "The quick brown fox", "How do I sort a list in Python?", "Water boils at", "The largest planet is",
    "Explain recursion to a child.", "import numpy as np\n", "My favourite recipe for pancakes:",
]


def formats(args: argparse.Namespace) -> None:
    """Each weight format vs fp32 on the same GGUF: decode step time and accuracy (teacher-forced greedy agreement
    over the fp32 continuations of 20 prompts, and max relative logit error |a - b|max / |a|max per prompt).

    int4 is the real engine path (ModelShard quant="int4": the file's Q4_1 codes in torch's int4 kernel, int8
    output head, bf16 activations; model/quant.py)."""
    from ollama_distributed.model.bundled import bundled_model_path
    from ollama_distributed.model.tokenizer import Tokenizer
    from ollama_distributed.model.transformer import ModelShard

    path = bundled_model_path("smollm2:135m")
    tok = Tokenizer.from_gguf(path)
    shards = {
        "fp32": ModelShard.from_file(path, dtype=torch.float32),
        "bf16": ModelShard.from_file(path, dtype=torch.bfloat16),
        "int4": ModelShard.from_file(path, quant="int4"),
    }
    ref = shards["fp32"]
    ids = [tok.encode(p) for p in PROMPTS]
    sids = list(range(len(ids)))

    def greedy(shard: ModelShard) -> list[list[int]]:
        """Free-running greedy continuations of every prompt (decoded together)."""
        cache = shard.new_cache(256)
        logits = shard.forward(torch.tensor([t for x in ids for t in x]), sids, [len(x) for x in ids], cache)
        gen: list[list[int]] = [[] for _ in ids]
        for _ in range(args.tokens):
            nxt = logits.argmax(-1)
            for g, t in zip(gen, nxt.tolist()):
                g.append(t)
            logits = shard.forward(nxt, sids, [1] * len(ids), cache)
        return gen

    gen = greedy(ref)
    full = [x + g for x, g in zip(ids, gen)]
    flat = torch.tensor([t for x in full for t in x])
    counts = [len(x) for x in full]

    def teacher_forced(shard: ModelShard) -> tuple[torch.Tensor, ...]:
        return shard.forward(flat, sids, counts, shard.new_cache(256), output="all_logits").split(counts)

    want = teacher_forced(ref)
    report = {}
    for name in ("bf16", "int4"):
        got = teacher_forced(shards[name])
        agree = total = 0
        errs = []
        for x, a, b in zip(ids, want, got):
            rows = slice(len(x) - 1, a.shape[0] - 1)  # positions that predicted the generated tokens
            agree += int((a[rows].argmax(-1) == b[rows].argmax(-1)).sum())
            total += a[rows].shape[0]
            errs.append(float((a - b).abs().max() / a.abs().max()))
        # free-running: tokens equal to fp32's at the same position, and prompts whose whole output is equal
        free = greedy(shards[name])
        same = sum(a == b for f, g in zip(free, gen) for a, b in zip(f, g)) / (len(gen) * args.tokens)
        whole = sum(f == g for f, g in zip(free, gen))
        report[name] = (agree / total, max(errs), sum(errs) / len(errs), same, whole)
    times: dict[str, float] = {}
    for _ in range(args.rounds):  # decode step time at context ~64, interleaved best-of
        for name, shard in shards.items():
            c = shard.new_cache(256)
            shard.forward(torch.arange(64), [0], [64], c)
            one = torch.tensor([1])
            shard.forward(one, [0], [1], c)
            t = _best(lambda: shard.forward(one, [0], [1], c), 20)
            times[name] = min(times.get(name, 1e9), t)
    print(f"load avg {os.getloadavg()[0]:.1f}; {len(PROMPTS)} prompts x {args.tokens} fp32-greedy tokens, teacher-forced")
    print(f"{'format':<8}{'MB':>6}{'decode ms':>10}{'tok/s':>8}{'greedy agree':>14}{'max rel logit err':>19}{'mean':>8}"
          f"{'free-running same':>19}{'whole outputs same':>20}")
    mb = {k: v.weight_bytes() / 1e6 for k, v in shards.items()}
    print(f"{'fp32':<8}{mb['fp32']:>6.0f}{times['fp32'] * 1e3:>10.2f}{1 / times['fp32']:>8.1f}{'(reference)':>14}")
    for name, (agree, emax, emean, same, whole) in report.items():
        print(f"{name:<8}{mb[name]:>6.0f}{times[name] * 1e3:>10.2f}{1 / times[name]:>8.1f}{agree * 100:>13.1f}%{emax:>19.4f}"
              f"{emean:>8.4f}{same * 100:>18.1f}%{whole:>15d}/{len(gen)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("concurrency", "batch", "profile", "formats"))
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--ab", action="store_true", help="concurrency: per-sequence vs batched decode attention")
    ap.add_argument("--amx-ab", action="store_true", help="concurrency: AMX tiles for batches off vs on (auto)")
    ap.add_argument("--conc", type=int, nargs="+", default=[1, 4, 8, 16])
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    {"concurrency": concurrency, "batch": batch, "profile": profile, "formats": formats}[args.what](args)


if __name__ == "__main__":
    main()
