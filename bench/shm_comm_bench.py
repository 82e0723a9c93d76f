"""Co-located shards' data paths, side by side in one run (issue 15): the tensor-parallel sum and the stage hop of a
decode step's hidden state (and of a prefill chunk's) over gloo on loopback vs shared memory (runtime/shm_comm.py).

Two processes (1 torch thread each, as shard workers run), one gloo world between them, and the same tensors over
each path, interleaved: median µs per all-reduce, and per one-way hop (half a ping-pong).

    python bench/shm_comm_bench.py [--iters 2000] [--hidden 576]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time


def _rank(rank: int, port: int, reduce_spec: dict, rings: list, hidden: int, iters: int, q) -> None:
    import torch
    import torch.distributed as dist

    from ollama_distributed.runtime.channel import ShmRing
    from ollama_distributed.runtime.shm_comm import ShmAllReduce, recv_tensor, send_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seg = ShmAllReduce.attach(reduce_spec, rank)
    out = ShmRing.attach(**{k: rings[rank][k] for k in ("path", "slots", "slot_bytes")})
    inp = ShmRing.attach(**{k: rings[1 - rank][k] for k in ("path", "slots", "slot_bytes")})
    nop = lambda: None  # noqa: E731
    res = {}
    for tokens in (1, 8, 512):
        t = torch.randn(tokens, hidden)
        n = iters if tokens < 512 else max(20, iters // 50)
        times: dict[str, list[float]] = {"gloo_all_reduce": [], "shm_all_reduce": [], "gloo_hop": [], "shm_hop": []}
        for _ in range(n):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            t1 = time.perf_counter()
            seg.all_reduce(t)
            t2 = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)
            t3 = time.perf_counter()
            if rank == 0:
                send_tensor(out, t, nop)
                t = recv_tensor(inp, t.shape, t.dtype, nop)
            else:
                t = recv_tensor(inp, t.shape, t.dtype, nop)
                send_tensor(out, t, nop)
            t4 = time.perf_counter()
            t.mul_(0.5)  # keep the values bounded
            times["gloo_all_reduce"].append(t1 - t0)
            times["shm_all_reduce"].append(t2 - t1)
            times["gloo_hop"].append((t3 - t2) / 2)
            times["shm_hop"].append((t4 - t3) / 2)
        res[tokens] = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    q.put((rank, res))
    out.detach()
    inp.detach()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=576)  # SmolLM2-135M
    args = ap.parse_args()
    from ollama_distributed.runtime.shm_comm import ShmAllReduce, create_hop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seg, rings = ShmAllReduce.create(2), [create_hop(), create_hop()]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, seg.spec(), [x.spec() for x in rings], args.hidden,
                                             args.iters, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        res = dict(q.get(timeout=1200) for _ in procs)[0]
    finally:
        for p in procs:
            p.join(60)
        seg.unlink()
        seg.detach()
        for r in rings:
            r.unlink()
            r.detach()
    print(f"co-located data paths, 2 processes, hidden {args.hidden}, median µs; load avg {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} CPUs)")
    print(f"{'tokens':>8}{'all-reduce gloo':>18}{'shm':>8}{'hop gloo':>12}{'shm':>8}")
    for tokens, r in res.items():
        print(f"{tokens:>8}{r['gloo_all_reduce']:>18.1f}{r['shm_all_reduce']:>8.1f}{r['gloo_hop']:>12.1f}"
              f"{r['shm_hop']:>8.1f}")


if __name__ == "__main__":
    sys.exit(main())
