"""One real Ray cluster for the whole test session: 4 local nodes (separate raylets) bound to 127.0.0.1.

Started lazily by the first test that asks for `ray_cluster` and shut down at the end of the session; tests must
not shut it down or start another one in this process (Ray allows one driver connection per process) — tests
that need their own cluster run it in a subprocess.
"""

from __future__ import annotations

import pytest

LOCAL_NODES = 4
NODE_MEMORY = "2GiB"


@pytest.fixture(scope="session")
def ray_cluster():
    from ollama_distributed.runtime.cluster import ClusterHandle

    handle = ClusterHandle.start_local(LOCAL_NODES, NODE_MEMORY)
    try:
        yield handle
    finally:
        handle.shutdown()
