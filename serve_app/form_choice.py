"""The fp32 inference form that a node's replicas chose for a model shape, kept for the cluster's lifetime.

A replica's first load of an fp32 artifact times its inference forms (models.fuse.fastest_inference_module: eager,
compiled, oneDNN; 25-60 s on 2 loaded cores, most of it compiling forms that lose). The choice depends on the
machine and the model's shapes, not its weights, so the next replica of that shape on the same node (a restart, a
redeploy with other args, a second app, a scale-up) builds the chosen form at once. Kept in the cluster's GCS
key-value store (serve_app/records.py) under the node's id, so it lasts as long as the cluster and never crosses
machines.

A replica asks `from_manifest` before both: the form the sweep timed for this very artifact
(tune/measure.measured_form, in the manifest's "inference_form"), when it was timed on a machine like this node at
this replica's torch threads. Then the served model is the measured model, and a replica starts without timing
anything.
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


def from_manifest(manifest: dict, threads: int) -> tuple[str, tuple[int, ...], list[list[int]] | None] | None:
    """(form name, the batch sizes it was chosen and planned at, the oneDNN form's per-conv choices or None) that
    `manifest` records was timed for its artifact (models.fuse.inference_form_record), when that timing holds
    here: same CPU model, architecture and core count, same torch version, same `threads`. None otherwise (a
    replica then times the forms itself), and for a manifest without the record (older artifacts, user-made ones,
    a quantized model, an eager-timed sweep) or with a damaged one. The name is one of models.fuse.INFERENCE_FORMS
    ("FoldedInference": `inference_module(model)`); the choices rebuild the oneDNN form's plans as timed
    (`OneDNNInference(model, example, batch_sizes, choices=...)`)."""
    from models.fuse import INFERENCE_FORMS, machine_fingerprint

    if not isinstance(manifest, dict):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    rec = manifest.get("inference_form")
    if not isinstance(rec, dict) or rec.get("form") not in INFERENCE_FORMS:
        return None
    sizes = rec.get("batch_sizes")
    if not isinstance(sizes, list) or not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        return None
    choices = rec.get("choices")
    if rec["form"] == "OneDNNInference" and not (
        isinstance(choices, list)
        and len(choices) == len(set(sizes))
        and all(isinstance(c, list) and all(isinstance(j, int) for j in c) for c in choices)
    ):
        return None
    here = {"threads": threads, **machine_fingerprint()}
    if any(rec.get(k) != v for k, v in here.items()):
        return None
    return rec["form"], tuple(sizes), choices if rec["form"] == "OneDNNInference" else None
