"""A real Ray cluster on this machine for the tests: ``ray.cluster_utils.Cluster``, a head
that runs no works (no CPU) and worker nodes of one CPU each, small object stores, no
dashboard, no usage stats, everything on loopback.

Loopback only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before Ray starts (without it
Ray advertises the machine's external address), and :meth:`RayTestCluster.start` checks
that every node's address is 127.0.0.1. The node processes inherit the environment they
are started with, which is how the works' actors get the S3 endpoint and credentials
(``env``): as on a real cluster, where each node's ``ray start`` has them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from envkit import environ

if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
    raise RuntimeError("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: it would leave loopback")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import ray  # noqa: E402 - after the environment that makes it use loopback
from ray.cluster_utils import Cluster  # noqa: E402

OBJECT_STORE = 80 << 20
LOOPBACK = "127.0.0.1"


def node_args(**extra: Any) -> dict[str, Any]:
    return {"num_cpus": 1, "object_store_memory": OBJECT_STORE, **extra}


class RayTestCluster:
    """A head and ``workers`` one-CPU worker nodes; :attr:`address` is the GCS address."""

    def __init__(self, workers: int = 3, env: dict[str, str] | None = None) -> None:
        self.workers = workers
        self.env = env or {}
        # A temp folder of its own (short: Ray's socket paths have a length limit), so that
        # other Ray sessions on the machine are neither seen nor touched.
        self.temp_dir = tempfile.mkdtemp(prefix="pr-", dir="/tmp")
        self.cluster: Cluster | None = None
        self.worker_nodes: list[Any] = []

    def start(self, connect: bool = True) -> RayTestCluster:
        with environ(self.env):
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False,
                "temp_dir": self.temp_dir, "node_ip_address": LOOPBACK,
            })
            self.worker_nodes = [self.add_node() for _ in range(self.workers)]
            self.cluster.wait_for_nodes()
        if connect:
            assert self.address.startswith(f"{LOOPBACK}:"), f"the Ray head advertises {self.address}, not loopback"
            ray.init(address=self.address, logging_level="WARNING")
            addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
            assert addresses == {LOOPBACK}, f"Ray nodes advertise {addresses}, not loopback only"
        return self

    @property
    def address(self) -> str:
        assert self.cluster is not None
        return str(self.cluster.address)

    def add_node(self, **extra: Any) -> Any:
        """A new one-CPU worker node (``resources={...}`` for custom ones); its ``node_id``."""
        assert self.cluster is not None
        with environ(self.env):
            return self.cluster.add_node(**node_args(node_ip_address=LOOPBACK, **extra))

    def remove_node(self, node: Any) -> None:
        assert self.cluster is not None
        self.cluster.remove_node(node, allow_graceful=False)

    def worker_node_ids(self) -> set[str]:
        return {n.node_id for n in self.worker_nodes}

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
