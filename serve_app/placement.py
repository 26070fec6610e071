"""Where the replicas that serve HTTP run, and which address they (and the HTTP frontend) bind.

With the HAProxy ingress (Ray 2.60, direct ingress) every replica starts its own HTTP server on Serve's one
`http_options.host` (there is no per-node host: ray/serve/_private/replica.py binds the controller's
http_options with a port of its own), and the head's HAProxy reaches a replica on its own node at 127.0.0.1
but one on another node at that node's Ray address (ray/serve/_private/haproxy.py `_target_to_server`). So:
- on one machine (every node at this machine's own address or on loopback: an embedded Ray, or tandem's simulated
  nodes on 127.0.0.2, ...) the host stays loopback (`http_host`), nothing listens beyond it, and the replicas
  must run on the head: nothing listens on 127.0.0.2 either. That cluster labels its head with
  SERVE_NODE_LABEL; when a live node carries it, the replicas get it as their `label_selector`.
- on a real cluster (a node at another machine's address) the host is 0.0.0.0, Ray's own HAProxy-mode default:
  a replica listens on every interface of its node, its private address among them, so the head's HAProxy
  reaches it wherever it lands; the head's HTTP frontend (HAProxy or Serve's proxy) listens on all the head's
  interfaces too, as a cluster's ingress must. A real cluster can still pin its replicas by giving a node the
  label (`ray start --labels`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SERVE_NODE_LABEL = ("tandem-serve-node", "head")
"""Node label (key, value) of the node the replicas must run on, where a node has it."""

LOOPBACK_HOST = "127.0.0.1"
ALL_INTERFACES_HOST = "0.0.0.0"


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


def host_for_nodes(addresses: Iterable[str], own: str) -> str:
    """Serve's HTTP host for a cluster whose live nodes have these Ray addresses, seen from a process at address
    `own`: loopback when every node is on loopback or at `own` (one machine), else all interfaces (module
    docstring). A cluster that has only its head now and autoscales later gets loopback: serve it with
    `tandem serve --host 0.0.0.0` (README)."""
    addrs = list(addresses)
    if not all(isinstance(a, str) and a for a in [*addrs, own]):
        raise TypeError(f"addresses must be non-empty strings, got {addrs!r} and own {own!r}")
    if all(a == own or a.startswith("127.") or a == "::1" for a in addrs):
        return LOOPBACK_HOST
    return ALL_INTERFACES_HOST


def http_host() -> str:
    """`host_for_nodes` of the connected cluster's live nodes (loopback when Ray is not connected)."""
    import ray

    if not ray.is_initialized():
        return LOOPBACK_HOST
    own = ray.util.get_node_ip_address()
    # a node record without an address (a test's stand-in for ray.nodes) counts as this machine
    return host_for_nodes((n.get("NodeManagerAddress", own) for n in ray.nodes() if n["Alive"]), own)


def client_host(host: str | None) -> str:
    """The address a client on the head uses for a frontend bound to `host` (None: not yet resolved, loopback
    or all interfaces, both of which answer on 127.0.0.1)."""
    return LOOPBACK_HOST if host in (None, ALL_INTERFACES_HOST, "::", "") else host


def replica_device(scheme: str, cuda_available: bool) -> str:
    """Where a replica runs an artifact of quantization `scheme`: "cuda" for the GPU schemes
    (serve_app.config.GPU_SCHEMES: FP8's `_scaled_mm`) when the replica has a GPU, else "cpu" (fp32 and the x86
    INT8 path run on CPU; an FP8 replica without a GPU falls back to the slow dequantized matmul)."""
    from serve_app.config import GPU_SCHEMES

    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a string, got {scheme!r}")
    return "cuda" if cuda_available and scheme in GPU_SCHEMES else "cpu"


def on_device(model, device: str):
    """`model` moved to `device`, taking and returning CPU tensors (the replica's batching and responses stay on
    CPU); the model itself when `device` is "cpu"."""
    import torch

    if device == "cpu":
        return model

    class OnDevice(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner.to(device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.to(device, non_blocking=True)).cpu()

    return OnDevice(model).eval()
