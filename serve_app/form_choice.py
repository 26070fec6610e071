"""The fp32 inference form that a node's replicas chose for a model shape, kept for the cluster's lifetime.

A replica's first load of an fp32 artifact times its inference forms (models.fuse.fastest_inference_module: eager,
compiled, oneDNN; 25-60 s on 2 loaded cores, most of it compiling forms that lose). The choice depends on the
machine and the model's shapes, not its weights, so the next replica of that shape on the same node (a restart, a
redeploy with other args, a second app, a scale-up) builds the chosen form at once. Kept in the cluster's GCS
key-value store (serve_app/records.py) under the node's id, so it lasts as long as the cluster and never crosses
machines.
"""

from __future__ import annotations

import hashlib

from serve_app import records


def _key(shape_key: tuple, threads: int) -> str:
    import ray
    import torch

    node = ray.get_runtime_context().get_node_id()
    digest = hashlib.sha256(repr((shape_key, threads, torch.__version__)).encode()).hexdigest()[:24]
    return f"fp32_form/{node}/{digest}"


def recall(shape_key: tuple, threads: int) -> str | None:
    """The form's class name chosen on this node for `shape_key` (serve_app.replica._form_key) at `threads` torch
    threads, None when none was."""
    return records.get(_key(shape_key, threads))


def remember(shape_key: tuple, threads: int, form: str) -> None:
    records.put(_key(shape_key, threads), form)
