"""Where the replicas that serve HTTP run.

With the HAProxy ingress every replica binds Serve's `http_options.host` (127.0.0.1 by tandem's default) on
whichever node it lands, and the head's HAProxy reaches a replica on its own node at 127.0.0.1 but one on another
node at that node's address. On tandem's simulated multi-node cluster (tandem/local_ray.py: extra raylets on
127.0.0.2, ... of one machine) nothing listens there, so the replicas must run on the head. That cluster labels its
head with SERVE_NODE_LABEL; when a live node carries it, the replicas get it as their `label_selector`. A real
cluster can pin its replicas the same way by giving a node that label (`ray start --labels`).
"""

from __future__ import annotations

from typing import Any

SERVE_NODE_LABEL = ("tandem-serve-node", "head")
"""Node label (key, value) of the node the replicas must run on, where a node has it."""


def replica_placement() -> dict[str, Any]:
    """`ray_actor_options` entries that place a replica: `{"label_selector": {key: value}}` when a live node of
    the connected cluster carries SERVE_NODE_LABEL, else {} (Serve places replicas as it likes)."""
    import ray

    if not ray.is_initialized():
        return {}
    key, value = SERVE_NODE_LABEL
    if any(n["Alive"] and n.get("Labels", {}).get(key) == value for n in ray.nodes()):
        return {"label_selector": {key: value}}
    return {}
