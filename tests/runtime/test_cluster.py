"""The local Ray cluster: real separate raylets on 127.0.0.1, measured, planned on, and cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from ollama_distributed.runtime.cluster import ClusterHandle, NodeNotFoundError, parse_size
from ollama_distributed.runtime.measure import to_cluster_spec

pytestmark = pytest.mark.slow

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _cluster_pids(temp_dir: str) -> set[int]:
    """Processes started for the cluster whose Ray files live in temp_dir (raylets, GCS, workers, agents)."""
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                pids.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def test_nodes_are_separate_raylets_on_loopback(ray_cluster):
    nodes = ray_cluster.nodes()
    assert [n.name for n in nodes] == ["node0", "node1", "node2", "node3"]
    assert nodes[0].is_head and not any(n.is_head for n in nodes[1:])
    assert len({n.node_id for n in nodes}) == 4
    assert all(n.address == "127.0.0.1" and n.alive for n in nodes)
    assert all(n.memory_budget == parse_size("2GiB") for n in nodes)
    with pytest.raises(NodeNotFoundError, match="node0, node1, node2, node3"):
        ray_cluster.node("node9")
    pids = _cluster_pids(ray_cluster.temp_dir) | {os.getpid()}
    raylets = [p for p in pids if psutil.Process(p).name() == "raylet"]
    assert len(raylets) == 4, "each local node is its own raylet process"
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "the cluster should be listening somewhere"
    outside = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening if c.laddr.ip not in LOOPBACK]
    assert not outside, f"listening beyond loopback: {outside}"


def test_measure_nodes_and_links_feed_the_scheduler(ray_cluster, tiny_gguf):
    m = ray_cluster.measure(gemv_bytes=16 * 2**20, repeats=3)
    assert [n.name for n in m.nodes] == ["node0", "node1", "node2", "node3"]
    for n in m.nodes:
        assert n.memory_bandwidth > 1e8 and n.flops > 1e8, n
        assert 0 < n.usable_memory <= n.memory_budget
        assert n.threads == 1  # local nodes declare 1 CPU each, and probes/shards use that many threads
    assert len(m.links) == 6
    for link in m.links:
        assert 0 < link.latency < 0.05 and link.bandwidth > 1e7, link
    assert ray_cluster.measure() is m  # cached while the node set is unchanged
    spec = to_cluster_spec(m)
    assert spec.names == ["node0", "node1", "node2", "node3"]
    assert spec.node("node1").memory_bytes == m.node("node1").usable_memory
    assert spec.link("node0", "node3").latency == pytest.approx(
        next(l.latency for l in m.links if {l.a, l.b} == {"node0", "node3"}))

    # measured cluster → scheduler plan → running executor, end to end
    from ollama_distributed.runtime.distributed_run import build_executor, plan_for_cluster
    from ollama_distributed.runtime.local_executor import LocalExecutor

    plan = plan_for_cluster(tiny_gguf, ray_cluster, strategy="pipeline", max_seq_len=64)
    assert plan.strategy in ("pipeline", "single")
    ex = build_executor(tiny_gguf, ray_cluster, plan=plan, max_seq_len=64)
    ref = LocalExecutor(tiny_gguf, max_seq_len=64, quant="native")  # build_executor's default format: auto
    try:
        a, b = ex.step([0], [[3, 4, 5]]), ref.step([0], [[3, 4, 5]])
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
        placed = ex.placement()
        assert {sh["node"] for st in placed["stages"] for sh in st["shards"]} <= set(spec.names)
    finally:
        ex.close()
        ref.close()


def test_cli_cluster_json_and_nothing_left_behind():
    """`ollama-distributed cluster --local-nodes 2 --json` in its own process: nodes, measurements, and after it
    exits no process of its cluster is left."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-c", "from ollama_distributed.cli import main; main()", "cluster", "--local-nodes", "2",
         "--node-memory", "1GB", "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert [n["name"] for n in out["nodes"]] == ["node0", "node1"]
    assert all(n["address"] == "127.0.0.1" and n["memory_budget"] == 10**9 // 2**20 * 2**20 for n in out["nodes"])
    assert len(out["measured"]["nodes"]) == 2 and len(out["measured"]["links"]) == 1
    assert [n["name"] for n in out["cluster_spec"]["nodes"]] == ["node0", "node1"]
    temp_dir = out["ray_temp_dir"]
    deadline = time.monotonic() + 15
    while _cluster_pids(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _cluster_pids(temp_dir), "processes of the CLI's cluster outlived it"
    assert not os.path.exists(temp_dir)


def test_cli_rejects_address_with_local_nodes():
    proc = subprocess.run(
        [sys.executable, "-c", "from ollama_distributed.cli import main; main()", "cluster", "--address", "auto",
         "--local-nodes", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and "not both" in proc.stderr


def test_parse_size():
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2g") == 2 * 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_only_one_cluster_per_process(ray_cluster):
    from ollama_distributed.runtime.cluster import ClusterError

    with pytest.raises(ClusterError, match="already connected"):
        ClusterHandle.start_local(1)
