"""Where the replicas that serve HTTP run, and which address they (and the HTTP frontend) bind.

With the HAProxy ingress (Ray 2.60, direct ingress) every replica starts its own HTTP server on Serve's one
`http_options.host` (there is no per-node host: ray/serve/_private/replica.py binds the controller's
http_options with a port of its own), and the head's HAProxy reaches a replica on its own node at 127.0.0.1
but one on another node at that node's Ray address (ray/serve/_private/haproxy.py `_target_to_server`). So:
- on one machine (the Ray tandem started itself: an embedded Ray, or tandem's simulated nodes on 127.0.0.2, ...)
  the host stays loopback (`http_host`), nothing listens beyond it, and the replicas
  must run on the head: nothing listens on 127.0.0.2 either. That cluster labels its head with
  SERVE_NODE_LABEL; when a live node carries it, the replicas get it as their `label_selector`.
- on a real cluster the host is 0.0.0.0, Ray's own HAProxy-mode default: a replica listens on every interface of
  its node, its private address among them, so the head's HAProxy reaches it wherever it lands; the head's HTTP
  frontend (HAProxy or Serve's proxy) listens on all the head's interfaces too, as a cluster's ingress must. A
  real cluster can still pin its replicas by giving a node the label (`ray start --labels`). Not the node's
  private address: the one host is bound on every node, and another node does not have the head's address.
Which of the two is decided by who started Ray, not by the nodes up now (`host_for_cluster`): tandem's own
embedded Ray (one node, or simulated nodes on loopback) stays on one machine, so loopback; a cluster tandem
connected to (`--address`) gets the cluster host even while only its head is up, because worker nodes that join
later (autoscaling, `ray start --address` by hand) get replicas too, and the host cannot change without a
restart of Serve. Only a head bound to loopback itself, which no other machine can join, stays on loopback.
"""

from __future__ import annotations

from typing import Any

SERVE_NODE_LABEL = ("tandem-serve-node", "head")
"""Node label (key, value) of the node the replicas must run on, where a node has it."""

LOOPBACK_HOST = "127.0.0.1"
ALL_INTERFACES_HOST = "0.0.0.0"


def _serve_node() -> dict[str, Any] | None:
    """The live node of the connected cluster that carries SERVE_NODE_LABEL (ray.nodes()'s entry), if any."""
    import ray

    key, value = SERVE_NODE_LABEL
    return next((n for n in ray.nodes() if n["Alive"] and n.get("Labels", {}).get(key) == value), None)


def replica_placement() -> dict[str, Any]:
    """`ray_actor_options` entries that place a replica: `{"label_selector": {key: value}}` when a live node of
    the connected cluster carries SERVE_NODE_LABEL, else {} (Serve places replicas as it likes)."""
    import ray

    if not ray.is_initialized() or _serve_node() is None:
        return {}
    key, value = SERVE_NODE_LABEL
    return {"label_selector": {key: value}}


def serve_node_cpus() -> float:
    """Logical CPUs of the node the replicas run on: the live node carrying SERVE_NODE_LABEL, else this process's
    node (0 when Ray is not connected)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    node = _serve_node()
    if node is None:
        here = ray.get_runtime_context().get_node_id()
        node = next((n for n in ray.nodes() if n["Alive"] and n["NodeID"] == here), None)
    return float(node["Resources"].get("CPU", 0.0)) if node else 0.0


def host_for_cluster(embedded: bool, head_address: str) -> str:
    """Serve's HTTP host (module docstring): loopback when tandem started this Ray itself (`embedded`) or the
    cluster's head is on loopback (`head_address`, the GCS host: no other machine can join it), else all
    interfaces, whatever nodes are up now."""
    if not isinstance(embedded, bool):
        raise TypeError(f"embedded must be a bool, got {embedded!r}")
    if not isinstance(head_address, str) or not head_address:
        raise TypeError(f"head_address must be a non-empty string, got {head_address!r}")
    host = head_address.strip("[]")
    if embedded or host.startswith("127.") or host in ("::1", "localhost"):
        return LOOPBACK_HOST
    return ALL_INTERFACES_HOST


def http_host(embedded: bool) -> str:
    """`host_for_cluster` of the connected cluster (loopback when Ray is not connected). `embedded`: this
    process started the Ray it is connected to (tandem.local_ray), rather than connecting to a cluster."""
    import ray

    if not ray.is_initialized():
        return LOOPBACK_HOST
    head = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]  # "host:port" of the head's GCS
    return host_for_cluster(embedded, head)


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
