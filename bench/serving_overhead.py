"""What a token costs through the API beyond the model step (issue 13), in one server process.

The real server (`create_app`, as `serve --dtype D` builds it; uvicorn in a thread) and, round by round:
  model   N−1 greedy one-token `executor.step` calls on the engine's own executor, on the engine thread, feeding
          back `argmax` (the model step plus the cheapest sampling, nothing else)
  api     /api/generate, "stream": false — eval_duration / (eval_count − 1), what users read off the API
  stream  the same, streamed (NDJSON line per token), read line by line by the client
The HTTP client runs in a subprocess (this script with --client), as a real client would. Rounds in which other
processes used more than --max-foreign cores (from /proc/stat) are discarded: on a shared machine a neighbour's
burst otherwise decides the result. Prints medians (ms per token) and each mode's overhead over `model`.

    python bench/serving_overhead.py [--dtype int4] [--tokens 128] [--rounds 10] [--max-foreign 0.1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

PROMPT = "Once upon a time"  # raw; SmolLM2 does not stop within 128 tokens of it


def client(port: int) -> None:
    """Reads 'stream num_predict' lines on stdin; answers each with the request's final line as JSON."""
    for line in sys.stdin:
        stream, n = line.split()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/api/generate", json.dumps({
            "model": "smollm2:135m", "prompt": PROMPT, "raw": True, "stream": stream == "1",
            "options": {"temperature": 0, "num_predict": int(n)}}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        final = [json.loads(x) for x in resp][-1] if stream == "1" else json.loads(resp.read())
        conn.close()
        print(json.dumps(final), flush=True)


def _busy_s() -> float:
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in f[11:13]) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="int4", choices=("auto", "int4", "float32", "bfloat16"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--max-foreign", type=float, default=0.1, help="cores other processes may use in a kept round")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client(args.client)

    import ollama_distributed  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
    import uvicorn

    from ollama_distributed.api.app import create_app
    from ollama_distributed.service.settings import ServerSettings

    port = args.port or 18000 + os.getpid() % 1000
    app = create_app(ServerSettings.from_env(host="127.0.0.1", port=port, dtype=args.dtype))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    cli = subprocess.Popen([sys.executable, __file__, "--client", str(port)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    n = args.tokens

    def api(stream: bool) -> float:
        cli.stdin.write(f"{int(stream)} {n}\n")
        cli.stdin.flush()
        final = json.loads(cli.stdout.readline())
        assert final["eval_count"] == n, final
        return final["eval_duration"] / 1e6 / (n - 1)

    api(False)  # loads the model
    runner = next(iter(app.state.od.manager._runners.values()))
    engine = runner.replicas[0].engine
    prompt = runner.tokenizer.encode(PROMPT)

    def model() -> float:
        ex, sid = engine.executor, 1 << 30
        tok = int(ex.step([sid], [prompt])[0].argmax())
        t0 = time.perf_counter()
        for _ in range(n - 1):
            tok = int(ex.step([sid], [[tok]])[0].argmax())
        dt = time.perf_counter() - t0
        ex.free(sid)
        return dt * 1e3 / (n - 1)

    modes = {"model": lambda: engine._call_on_loop(model), "api": lambda: api(False), "stream": lambda: api(True)}
    for fn in modes.values():
        fn()  # warm-up
    res: dict[str, list[float]] = {m: [] for m in modes}
    mine = [os.getpid(), cli.pid]
    tried = 0
    while len(res["model"]) < args.rounds and tried < 6 * args.rounds:
        tried += 1
        b0, c0, t0 = _busy_s(), _own_cpu_s(mine), time.time()
        trial = {m: fn() for m, fn in modes.items()}
        foreign = ((_busy_s() - b0) - (_own_cpu_s(mine) - c0)) / (time.time() - t0)
        kept = foreign <= args.max_foreign
        print(f"round {tried}: " + "  ".join(f"{m} {v:.2f}" for m, v in trial.items())
              + f"  (foreign load {foreign:.2f} cores{'' if kept else ', discarded'})", file=sys.stderr, flush=True)
        if kept:
            for m, v in trial.items():
                res[m].append(v)
    cli.stdin.close()
    cli.wait()
    server.should_exit = True
    if not res["model"]:
        sys.exit("no quiet round: the machine is too busy")
    base = statistics.median(res["model"])
    print(f"dtype {args.dtype}, {n} tokens, {len(res['model'])} of {tried} rounds kept, "
          f"load avg {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    print(f"{'mode':8}{'ms/token':>10}{'tok/s':>8}{'over model':>12}")
    for m, v in res.items():
        med = statistics.median(v)
        print(f"{m:8}{med:10.2f}{1e3 / med:8.1f}{med - base:+11.2f}")


if __name__ == "__main__":
    main()
