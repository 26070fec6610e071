"""Connecting to Ray for a tandem command: an existing cluster (`--address`) or an embedded local one.

The embedded cluster over-declares logical CPUs (Train workers + Ray Data + Serve would otherwise wait on each
other on a small machine; see shared/ENV.md) and can simulate several nodes on one machine: extra raylets on
127.0.0.2, 127.0.0.3, ... so Ray Train groups workers into nodes and the hierarchical allreduce has two levels.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def ray_session(
    address: str | None = None, nodes: int = 1, cpus_per_node: int = 8, slots_per_node: int = 2
) -> Iterator[dict]:
    """Connects to `address`, or starts an embedded cluster of `nodes` simulated nodes, each offering
    `slots_per_node` units of the custom resource `worker_slot` (so Train workers asking for one each are spread
    evenly over the simulated nodes); shuts down what it started."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        try:
            yield {"address": address, "embedded": False, "nodes": len(ray.nodes())}
        finally:
            ray.shutdown()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if nodes == 1:
        ray.init(num_cpus=cpus_per_node, resources={"worker_slot": slots_per_node}, include_dashboard=True)
        try:
            yield {"address": "embedded", "embedded": True, "nodes": 1}
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster

    slots = {"worker_slot": slots_per_node}
    head = {"num_cpus": cpus_per_node, "resources": slots, "include_dashboard": True}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for i in range(1, nodes):
            cluster.add_node(num_cpus=cpus_per_node, resources=slots, node_ip_address=f"127.0.0.{i + 1}")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=True)
        yield {"address": cluster.address, "embedded": True, "nodes": nodes}
    finally:
        ray.shutdown()
        cluster.shutdown()
