"""Install-time build of this machine's CPU kernels (src/ollama_distributed/model/cpu_kernels.py).

The kernels are C++ compiled with torch.utils.cpp_extension for the CPU they run on (AVX-512 VNNI or AVX2), which
takes 20-60 s. Compiled here, during `pip install --no-build-isolation`, they land in torch's extension cache
(~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR) under the same digest-named module the runtime loads, so a
fresh install's first request does not wait for a compile (issue 13). pip's default isolated build environment has
no torch: the build is then skipped with a note, and `serve` / `run` compile the kernels in the background at start
as before. A failed build never fails the install.
"""

from __future__ import annotations

import os
import sys
import time

from setuptools import setup
from setuptools.command.build_py import build_py


def build_kernels() -> None:
    if os.environ.get("OLLAMA_DISTRIBUTED_CPU_KERNELS", "1") == "0":
        return
    try:
        import torch  # noqa: F401 - present only without build isolation
    except ImportError:
        print("ollama-distributed: torch is not importable in this build environment (pip's build isolation); "
              "the CPU kernels will be compiled on first use. `pip install --no-build-isolation` compiles them now.",
              file=sys.stderr)
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    try:
        from ollama_distributed.model import cpu_kernels

        t0 = time.perf_counter()
        ready = cpu_kernels.native_ops() is not None
        cpu_kernels.ops()
        print(f"ollama-distributed: CPU kernels {'built' if ready else 'not applicable here'} "
              f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the runtime builds (or falls back) on first use
        print(f"ollama-distributed: CPU kernels not built at install time ({exc}); they build on first use",
              file=sys.stderr)
    finally:
        sys.path.pop(0)


class BuildPyWithKernels(build_py):
    """build_py (which editable installs run too), then the kernels."""

    def run(self) -> None:
        super().run()
        build_kernels()


if __name__ == "__main__":  # (setuptools' build backend runs this file as __main__; bench/ imports build_kernels)
    setup(cmdclass={"build_py": BuildPyWithKernels})
