"""A Ray cluster to run shards on: connect to an existing one, or start N local nodes bound to 127.0.0.1.

Two ways to get a `ClusterHandle`:

* `ClusterHandle.connect("HEAD:PORT" | "auto")` joins a running cluster (real machines started with
  `ray start --head` / `ray start --address HEAD:PORT`). Name each node for plans with the label
  `ollama-distributed.io/node=<name>` (`ray start ... --labels ollama-distributed.io/node=box1`) and give it a
  memory budget with `--resources '{"od_memory_mib": 8192}'`; unnamed nodes are called by their address.
* `ClusterHandle.start_local(local_nodes=N, node_memory=...)` starts an embedded cluster of N *separate raylets*
  on this machine (`ray.cluster_utils.Cluster`: each node is its own raylet + object store + worker processes,
  so a test can kill one node and the others live on). Nodes are named node0 … node{N-1}; node0 is the head.

Loopback only: Ray resolves "127.0.0.1" to the machine's outward address unless its constant
`ENABLE_RAY_CLUSTER` is off (ray/_private/services.py `resolve_ip_for_localhost`). That constant is read from
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` when ray is imported, so `start_local` sets the environment variable (for the
raylets and workers it spawns) *and* the already-imported constant (for this process), and restores both on
shutdown. Every listening socket of a local cluster is then on 127.0.0.1 (checked by tests with `ss`/psutil).

Token authentication (Ray 2.60): `ray.init()` without an address turns on `RAY_AUTH_MODE=token` and writes
~/.ray/auth_token if missing; `ray start --head` turns it on when that token file exists (else it warns and runs
without auth); drivers and `ray start --address` pick the token up from the same file. The embedded local cluster
is started through `ray.cluster_utils.Cluster`, which does not enable it — acceptable because it listens on
loopback only. Real machines (the path bench/netns_two_nodes.sh runs, with two network namespaces):
  head:    ray get-auth-token --generate        # once; writes ~/.ray/auth_token
           export RAY_AUTH_MODE=token
           ray start --head --node-ip-address IP --port 6379 --labels ollama-distributed.io/node=NAME \
                     --resources '{"od_memory_mib": 8192}'
  others:  copy ~/.ray/auth_token to each machine (or export RAY_AUTH_TOKEN=<token>), export RAY_AUTH_MODE=token,
           ray start --address HEAD_IP:6379 --node-ip-address IP --labels ... --resources ...
  driver:  RAY_AUTH_MODE=token ollama-distributed <command> --address HEAD_IP:6379
Every node must have the model file at the same path (workers read their slice locally). gloo binds to the
interface holding the node's Ray address (collectives.bind_gloo_to; override with GLOO_SOCKET_IFNAME).

Failure detection: the GCS pings each raylet every `health_check_period_ms` and declares it dead after
`health_check_failure_threshold` misses (Ray's defaults: 3000 ms × 5 = ~15 s). Local clusters use 500 ms × 3
with a 1000 ms timeout, so a killed node is marked dead within ~2-3 s (see `HealthConfig`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

log = logging.getLogger(__name__)

NODE_NAME_LABEL = "ollama-distributed.io/node"
MEMORY_RESOURCE = "od_memory_mib"  # a node's memory budget for shards, in MiB (Ray resources are fixed-point floats)
MIB = 1024 * 1024
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# Return values up to this size travel inline in the task reply instead of through the object store. A step's
# logits are 4·vocab bytes per sequence (196 KiB for a 49k vocabulary); through plasma one costs ~2 ms more per
# call than inline (measured on the 2-core dev box: 3.5 ms vs 1.7 ms for a 196 KiB return). Ray's default is 100 KiB.
_SYSTEM_CONFIG = {"max_direct_call_object_size": 8 * 1024 * 1024, "task_rpc_inlined_bytes_limit": 32 * 1024 * 1024}


class ClusterError(RuntimeError):
    """The cluster could not be started, joined or used; the message says what and where."""


class NodeNotFoundError(ClusterError, KeyError):
    """A plan or a command names a node the cluster does not have (alive)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class HealthConfig:
    """How fast the GCS declares a silent node dead (Ray `_system_config` keys of the same names).

    period_ms: interval between health checks of each raylet. timeout_ms: how long one check may take.
    failure_threshold: consecutive failed checks before the node is marked dead. initial_delay_ms: grace after
    a node registers. Worst-case detection ≈ period_ms × failure_threshold + timeout_ms.
    """

    period_ms: int = 500
    timeout_ms: int = 1000
    failure_threshold: int = 3
    initial_delay_ms: int = 1000

    def __post_init__(self) -> None:
        for name in ("period_ms", "timeout_ms", "failure_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"HealthConfig.{name} must be >= 1, got {getattr(self, name)}")

    def system_config(self) -> dict[str, int]:
        return {
            "health_check_period_ms": self.period_ms,
            "health_check_timeout_ms": self.timeout_ms,
            "health_check_failure_threshold": self.failure_threshold,
            "health_check_initial_delay_ms": self.initial_delay_ms,
        }


@dataclass(frozen=True)
class NodeInfo:
    """One Ray node as Ray reports it.

    name: the node's name in plans (label `ollama-distributed.io/node`, else its address, else address + id).
    node_id: Ray's hex node id. address: IP the raylet listens on. alive: Ray's view (False once the GCS declared
    it dead). resources: Ray's total resources of the node. memory_budget: bytes for shards (from the
    `od_memory_mib` resource; None when the node does not declare one). is_head: runs the GCS.
    """

    name: str
    node_id: str
    address: str
    alive: bool
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    memory_budget: int | None = None
    is_head: bool = False

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0.0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node_id": self.node_id,
            "address": self.address,
            "alive": self.alive,
            "is_head": self.is_head,
            "cpus": self.cpus,
            "gpus": self.gpus,
            "memory_budget": self.memory_budget,
            "resources": dict(self.resources),
            "labels": dict(self.labels),
        }


def parse_size(value: str | int | float | None) -> int | None:
    """'8GB' / '512MiB' / '2g' / 1024 → bytes (decimal SI for kB/MB/GB/TB, binary for KiB/MiB/GiB/TiB and the
    one-letter k/m/g/t that `docker --memory` uses). None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    units = {
        "tib": 1024**4, "gib": 1024**3, "mib": 1024**2, "kib": 1024,
        "tb": 10**12, "gb": 10**9, "mb": 10**6, "kb": 10**3,
        "t": 1024**4, "g": 1024**3, "m": 1024**2, "k": 1024, "b": 1, "": 1,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number = text[: len(text) - len(suffix)] if suffix else text
            try:
                n = float(number)
            except ValueError:
                break
            if n < 0:
                break
            return int(n * units[suffix])
    raise ValueError(f"cannot read size {value!r}; write it like 8GB, 512MiB or 2g")


class ClusterHandle:
    """A live Ray cluster this process is connected to. One per process (Ray allows one driver connection).

    Use `connect()` or `start_local()`; call `shutdown()` (or use it as a context manager) when done: for a local
    cluster it stops every Ray process it started; for a joined cluster it only disconnects.
    """

    def __init__(self, address: str, local: Any = None, temp_dir: str | None = None, saved_env: dict | None = None) -> None:
        self.address = address
        self._local = local  # ray.cluster_utils.Cluster for embedded clusters
        self._temp_dir = temp_dir
        self._saved_env = saved_env or {}
        self._measurement: Any = None  # measure.ClusterMeasurement, cached per set of alive nodes
        self._closed = False

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def connect(cls, address: str = "auto", *, namespace: str = "ollama-distributed") -> "ClusterHandle":
        """Join an existing cluster at HEAD:PORT (or "auto": the one `ray start` left on this machine)."""
        import ray

        if ray.is_initialized():
            raise ClusterError("this process is already connected to Ray; shut that connection down first")
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
        handle = cls(ray.get_runtime_context().gcs_address)
        log.info("connected to Ray cluster at %s with %d node(s)", handle.address, len(handle.nodes()))
        return handle

    @classmethod
    def start_local(
        cls,
        local_nodes: int = 1,
        node_memory: int | str | None = None,
        *,
        cpus_per_node: int = 1,
        health: HealthConfig = HealthConfig(),
        object_store_memory: int = 128 * MIB,
        namespace: str = "ollama-distributed",
    ) -> "ClusterHandle":
        """Start `local_nodes` Ray nodes (separate raylets) on 127.0.0.1, each with a shard memory budget.

        node_memory: bytes (or "4GB") each node offers for shards, exposed as the `od_memory_mib` resource
        (default: this machine's available memory split evenly). cpus_per_node: Ray CPUs per node; shard actors
        ask for none (they are placed by node affinity), so this only bounds probe tasks.
        """
        import psutil
        import ray
        import ray._private.ray_constants as ray_constants
        from ray.cluster_utils import Cluster

        if local_nodes < 1:
            raise ValueError(f"local_nodes must be >= 1, got {local_nodes}")
        if ray.is_initialized():
            raise ClusterError("this process is already connected to Ray; shut that connection down first")
        budget = parse_size(node_memory)
        if budget is None:
            budget = psutil.virtual_memory().available // local_nodes
        if budget < MIB:
            raise ValueError(f"node_memory must be at least 1 MiB, got {budget} bytes")

        # Short path: Ray puts unix sockets under the temp dir, and those paths are limited to 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="odray-", dir="/tmp")
        saved = {k: os.environ.get(k) for k in (_LOOPBACK_ENV, "RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED")}
        saved["__constant__"] = ray_constants.ENABLE_RAY_CLUSTER
        os.environ[_LOOPBACK_ENV] = "0"
        os.environ["RAY_TMPDIR"] = temp_dir  # cluster_utils ignores temp_dir for worker nodes; the env var is honoured
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        handle = cls("", None, temp_dir, saved)
        try:
            mib = budget // MIB
            common = dict(
                node_ip_address="127.0.0.1",
                num_cpus=cpus_per_node,
                object_store_memory=object_store_memory,
            )
            cluster = Cluster(shutdown_at_exit=True)
            handle._local = cluster
            for i in range(local_nodes):
                args = dict(common, resources={MEMORY_RESOURCE: float(mib)}, labels={NODE_NAME_LABEL: f"node{i}"})
                if i == 0:
                    args.update(include_dashboard=False, _system_config=_SYSTEM_CONFIG | health.system_config())
                cluster.add_node(**args)
            cluster.wait_for_nodes(timeout=60)
            ray.init(address=cluster.address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)
            handle.address = cluster.address
        except BaseException:
            handle.shutdown()
            raise
        log.info("started a local Ray cluster of %d node(s) at %s (%d MiB each)", local_nodes, handle.address, mib)
        return handle

    # ---- queries -------------------------------------------------------------------------------------------
    def nodes(self, include_dead: bool = False) -> list[NodeInfo]:
        """Nodes Ray knows, alive ones first in a stable order (head, then by name)."""
        import ray

        self._check_open()
        raw = [n for n in ray.nodes() if include_dead or n.get("Alive")]
        addr_count: dict[str, int] = {}
        for n in raw:
            addr_count[n["NodeManagerAddress"]] = addr_count.get(n["NodeManagerAddress"], 0) + 1
        out = []
        for n in raw:
            labels = dict(n.get("Labels") or {})
            res = dict(n.get("Resources") or {})
            addr = n["NodeManagerAddress"]
            name = labels.get(NODE_NAME_LABEL) or (addr if addr_count[addr] == 1 else f"{addr}-{n['NodeID'][:6]}")
            mem = res.get(MEMORY_RESOURCE)
            out.append(
                NodeInfo(
                    name=name,
                    node_id=n["NodeID"],
                    address=addr,
                    alive=bool(n.get("Alive")),
                    resources=res,
                    labels=labels,
                    memory_budget=int(mem * MIB) if mem is not None else None,
                    is_head="node:__internal_head__" in res,
                )
            )
        out.sort(key=lambda x: (not x.alive, not x.is_head, _natural(x.name)))
        return out

    def node(self, name: str) -> NodeInfo:
        """The alive node called `name` (NodeNotFoundError lists the ones there are)."""
        nodes = self.nodes()
        for n in nodes:
            if n.name == name:
                return n
        raise NodeNotFoundError(f"no alive node named {name!r}; alive nodes: {', '.join(n.name for n in nodes) or 'none'}")

    def node_id(self, name: str) -> str:
        return self.node(name).node_id

    def name_of(self, node_id: str) -> str:
        for n in self.nodes(include_dead=True):
            if n.node_id == node_id:
                return n.name
        raise NodeNotFoundError(f"no node with id {node_id}")

    @property
    def temp_dir(self) -> str | None:
        """Ray's session files of a local cluster (every process it starts names this path); None when joined."""
        return self._temp_dir

    @property
    def is_local(self) -> bool:
        return self._local is not None

    def wait_for_nodes(self, count: int, timeout: float = 30.0) -> list[NodeInfo]:
        """Block until exactly `count` nodes are alive (a node joining or being declared dead)."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes()
            if len(nodes) == count:
                return nodes
            if time.monotonic() > deadline:
                raise ClusterError(f"expected {count} alive node(s) within {timeout:.0f} s, have {len(nodes)}")
            time.sleep(0.1)

    # ---- local-cluster control (tests, demos) --------------------------------------------------------------
    def add_local_node(self, name: str, node_memory: int | str, cpus: int = 1) -> NodeInfo:
        """Start one more local node (a raylet) called `name` with `node_memory` for shards."""
        if self._local is None:
            raise ClusterError("add_local_node needs a cluster started with start_local()")
        budget = parse_size(node_memory) or 0
        self._local.add_node(
            node_ip_address="127.0.0.1",
            num_cpus=cpus,
            object_store_memory=128 * MIB,
            resources={MEMORY_RESOURCE: float(budget // MIB)},
            labels={NODE_NAME_LABEL: name},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                return self.node(name)
            except NodeNotFoundError:
                time.sleep(0.1)
        raise ClusterError(f"node {name!r} did not register within 30 s")

    def kill_node(self, name: str, graceful: bool = False) -> None:
        """Kill a local node's raylet and every worker process on it (like a machine failing). Not the head."""
        if self._local is None:
            raise ClusterError("kill_node needs a cluster started with start_local()")
        target = self.node(name)
        if target.is_head:
            raise ClusterError(f"{name} is the head node (it runs the GCS and this driver); kill a worker node")
        for node in list(self._local.worker_nodes):
            if node.node_id == target.node_id:
                self._local.remove_node(node, allow_graceful=graceful)
                return
        raise NodeNotFoundError(f"node {name!r} was not started by this handle")

    # ---- measurement -------------------------------------------------------------------------------------
    def measure(self, refresh: bool = False, **probe_options: Any):
        """Measured node speeds/memory and links (runtime/measure.py), cached until the alive nodes change."""
        from .measure import measure_cluster

        ids = tuple(sorted(n.node_id for n in self.nodes()))
        cached = self._measurement
        if refresh or cached is None or cached[0] != ids:
            self._measurement = (ids, measure_cluster(self, **probe_options))
        return self._measurement[1]

    # ---- teardown ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Disconnect; for a local cluster also stop every Ray process it started and delete its temp dir."""
        if self._closed:
            return
        self._closed = True
        import ray

        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if self._local is not None:
                try:
                    self._local.shutdown()
                finally:
                    self._local = None
            if self._saved_env:
                import ray._private.ray_constants as ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = self._saved_env.pop("__constant__")
                for k, v in self._saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            if self._temp_dir:
                shutil.rmtree(self._temp_dir, ignore_errors=True)

    close = shutdown

    def __enter__(self) -> "ClusterHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise ClusterError("the cluster handle is shut down")


def _natural(name: str) -> tuple:
    """Sort node2 before node10."""
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def cluster_from_cli(address: str | None, local_nodes: int | None, node_memory: str | int | None) -> ClusterHandle:
    """The cluster a command asked for: `--address` joins one; otherwise `--local-nodes N` (default 1) local nodes.

    Shared by `cluster`, `run` and `serve`, so every command reads these flags the same way.
    """
    if address and local_nodes:
        raise ValueError("give either --address (join a cluster) or --local-nodes (start one here), not both")
    if address:
        if node_memory is not None:
            raise ValueError("--node-memory applies to --local-nodes; declare memory on real nodes with `ray start --resources`")
        return ClusterHandle.connect(address)
    return ClusterHandle.start_local(local_nodes or 1, node_memory)
