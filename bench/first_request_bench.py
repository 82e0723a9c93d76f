"""A fresh install's first request vs a warm one's (issue 13): wall time of
`ollama-distributed run --embedded smollm2:135m PROMPT --temperature 0 --num-predict N` (process start, model load,
the answer) with torch's extension cache (TORCH_EXTENSIONS_DIR) in three states, side by side in one run:

  cold       empty: what a fresh machine gets when the kernels were not built at install time (pip's default build
             isolation has no torch), so the first run waits for the compile;
  installed  filled by setup.py's install-time build (`pip install --no-build-isolation`), then the first run;
  warm       the same cache, run again.

    python bench/first_request_bench.py [--num-predict 32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-predict", type=int, default=32)
    args = ap.parse_args()
    run = [sys.executable, "-m", "ollama_distributed.cli", "run", "--embedded", "smollm2:135m", "Why is the sky blue?",
           "--temperature", "0", "--num-predict", str(args.num_predict)]
    cold, installed = tempfile.mkdtemp(prefix="te-cold-"), tempfile.mkdtemp(prefix="te-installed-")
    # what setup.py does during `pip install --no-build-isolation` (its build_kernels), into its own cache
    build_s = timed([sys.executable, "-c", "import setup; setup.build_kernels()"],
                    {"TORCH_EXTENSIONS_DIR": installed, "PYTHONPATH": str(ROOT)})
    res = {
        "cold (first run compiles)": timed(run, {"TORCH_EXTENSIONS_DIR": cold}),
        "installed (first run after the install-time build)": timed(run, {"TORCH_EXTENSIONS_DIR": installed}),
        "warm (second run)": timed(run, {"TORCH_EXTENSIONS_DIR": installed}),
    }
    print(f"first request, `run` wall time ({args.num_predict} tokens, greedy); load avg {os.getloadavg()[0]:.1f}")
    print(f"  install-time build: {build_s:.1f} s")
    warm = res["warm (second run)"]
    for name, s in res.items():
        print(f"  {name:52}{s:7.1f} s  ({s - warm:+.1f} s vs warm)")


if __name__ == "__main__":
    main()
