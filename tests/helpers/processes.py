"""Process helpers shared by the fault tests."""

from __future__ import annotations

import os
import signal


def release(pid: int) -> None:
    """Never leave a stopped process behind, whatever the test's outcome: continue it, then kill it."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
