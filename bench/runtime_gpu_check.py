"""CUDA path of the shard worker, without Ray (for a GPU machine that has torch but not Ray).

Runs ShardWorker (runtime/worker.py) exactly as the Ray actors do — load → setup_comm → step — in processes
started with torch.multiprocessing, on one GPU:
  * a 1-shard world on NCCL (the backend RayExecutor picks when every shard has a GPU);
  * a 2-stage pipeline and a 2-way tensor-parallel stage, both shards on the same GPU, over gloo with host staging
    (NCCL refuses two ranks on one GPU, so one machine with one GPU cannot run an NCCL pair);
and checks the logits against the whole model on the CPU (max relative error ≤ 1e-4) and greedy tokens equal.
Usage: python bench/runtime_gpu_check.py MODEL.gguf
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.multiprocessing as mp

from ollama_distributed.model.shard import ShardSpec
from ollama_distributed.model.weights import read_config
from ollama_distributed.runtime.collectives import plan_layout
from ollama_distributed.runtime.local_executor import LocalExecutor
from ollama_distributed.runtime.placement import uniform_plan, shard_specs
from ollama_distributed.runtime.worker import ShardWorker

PROMPT = [1, 5, 9, 33, 2, 7]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, path, specs, layout, port, backend, q):
    w = ShardWorker(threads=2)
    spec = specs[rank]
    info = w.load(path, {"layers": spec.layers, "kv_heads": spec.kv_heads, "ffn": spec.ffn,
                         "has_embedding": spec.has_embedding, "has_output": spec.has_output}, "float32", 128)
    w.setup_comm(layout[rank], "127.0.0.1", port, backend, 60)
    lay = layout[rank]
    toks, logits = [], []
    x = torch.tensor(PROMPT)
    out = w.step([0], [len(PROMPT)], x if lay.is_first_stage else None, "logits", 1)
    for _ in range(5):
        if out is not None:
            logits.append(out[0])
        # every rank needs the next token: the output rank broadcasts it over the plan's world
        t = torch.zeros(1, dtype=torch.int64)
        if out is not None:
            t[0] = int(out[0].argmax())
        import torch.distributed as dist
        if len(specs) > 1:
            dist.broadcast(t, src=next(r for r, s in enumerate(specs) if s.has_output))
        toks.append(int(t[0]))
        out = w.step([0], [1], t if lay.is_first_stage else None, "logits", 1)
    w.close()
    q.put((rank, info["device"], toks, [l.cpu().tolist() for l in logits]))  # plain lists: no shared memory


def run(path, stage_nodes, backend):
    cfg = read_config(path)
    plan = uniform_plan(cfg, stage_nodes)
    specs = [spec for row in shard_specs(plan, cfg) for (_, spec, _) in row]
    layout = plan_layout([len(r) for r in stage_nodes])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_rank, args=(r, path, specs, layout, port, backend, q)) for r in range(len(specs))]
    for p in procs:
        p.start()
    res = []
    for _ in procs:
        try:
            res.append(q.get(timeout=90))
        except Exception as exc:
            for p in procs:
                p.kill()
            raise SystemExit(f"a rank failed ({exc!r}; exit codes {[p.exitcode for p in procs]})")
    res.sort()
    for p in procs:
        p.join(60)
    return res


def main() -> None:
    path = sys.argv[1]
    cuda = torch.cuda.is_available()  # without a GPU the gloo cases run on the CPU (a dry run of this script)
    ref = LocalExecutor(path, max_seq_len=128)  # CPU reference
    logits = ref.step([0], [PROMPT])
    ref_toks, ref_logits = [], [logits[0]]
    for _ in range(5):
        t = int(logits[0].argmax())
        ref_toks.append(t)
        logits = ref.step([0], [[t]])
        ref_logits.append(logits[0])
    ok = True
    cases = [("pp2-gloo", [["a"], ["b"]], "gloo"), ("tp2-gloo", [["a", "b"]], "gloo")]
    if cuda:
        cases.insert(0, ("single-nccl", [["a"]], "nccl"))
    for name, shape, backend in cases:
        res = run(path, shape, backend)
        devices = [r[1] for r in res]
        out = next(r for r in res if r[3])
        err = max((torch.tensor(a) - b).abs().max().item() / max(1.0, b.abs().max().item()) for a, b in zip(out[3], ref_logits))
        good = all(d.startswith("cuda") == cuda for d in devices) and out[2] == ref_toks and err <= 1e-4
        ok &= good
        print(f"{name}: devices {devices} tokens {out[2]} (cpu {ref_toks}) max rel err {err:.2e} -> {'OK' if good else 'FAIL'}")
    print("ALL OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
