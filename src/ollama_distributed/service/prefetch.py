"""`/api/pull` on a distributed server also stages the model's weights on the nodes that will run it.

Ollama's pull means "make this model ready to run here". Across a cluster that is more than the blob in the
server's store: every node the scheduler would place a shard on, and that lacks the file, must first fetch its
slice (runtime/weight_fetch.py). So a pull, once the blob is present, plans the model as a load would
(service/replicas.py plan_on: the same strategy, replicas, drained and backed-off nodes, and holders preferred), has
those nodes fetch their slices now, and streams their progress as pull status lines, one per node, in the shape
every Ollama client reads (`{"status", "digest", "total", "completed"}`, api/types.go ProgressResponse): status
"pulling slice node NODE", digest the model blob's, total/completed that node's bytes. The first request then
loads from the nodes' slice caches. A server in-process or on --local-nodes, or a cluster whose nodes all hold
the file, adds no line.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

log = logging.getLogger(__name__)


def prefetch_status(manager: Any, entry: Any) -> Iterator[dict[str, Any]]:
    """Pull status lines while the nodes of `entry`'s plan fetch their slices (see the module docstring). Raises
    creator.PullError naming the node when a fetch fails."""
    # Only on a real cluster (--address): --local-nodes starts every node on this machine, where each sees the
    # server's store, so there is nothing to stage and a pull need not start or measure a cluster.
    if not manager.settings.address or entry.model_path is None or entry.model_path.is_dir():
        return
    from ..runtime.weight_fetch import WeightFetchError, prefetch
    from .creator import PullError
    from .replicas import plan_on, usable_nodes

    s = manager.settings
    cluster = manager.cluster()
    try:
        plans = plan_on(entry.model_path, cluster, usable_nodes(cluster, manager.node_health().backed_off()),
                        s.strategy, manager.torch_dtype(), s.max_replicas, s.kv_cache_type).plans
    except Exception as exc:  # noqa: BLE001 - the model is pulled; where it runs is decided (or refused) at its load
        log.warning("pull %s: no plan to stage its weights on: %s", entry.name.display, exc)
        return
    digest = next((l.digest for l in entry.layers if l.media_type.endswith(".model")), None)
    last: dict[str, tuple[int, int]] = {}
    try:
        for rows in prefetch(entry.model_path, plans, cluster):
            for r in rows:
                now = (r["bytes_done"], r["bytes_total"])
                if last.get(r["node"]) != now:
                    last[r["node"]] = now
                    yield {"status": f"pulling slice node {r['node']}", "digest": digest, "total": now[1],
                           "completed": now[0]}
    except WeightFetchError as exc:
        raise PullError(f"staging the weights on the cluster: {exc}") from exc
