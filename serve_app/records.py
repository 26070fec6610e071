"""tandem's small records in the Ray cluster's GCS key-value store, all in one namespace: what each model replica
serves (serve_app/served.py) and the fp32 form a node chose for a model shape (serve_app/form_choice.py). They
live as long as the cluster (or until deleted); values are JSON or short strings."""

from __future__ import annotations

import json
from typing import Any

NAMESPACE = "tandem_serve"
"""The GCS key-value namespace of every tandem record."""


def put(key: str, value: Any) -> None:
    """Stores `value` (JSON-serializable) under `key`, replacing what was there."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, json.dumps(value), overwrite=True, namespace=NAMESPACE)


def get(key: str) -> Any | None:
    """The value stored under `key`, None when there is none."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(key, namespace=NAMESPACE)
    return None if raw is None else json.loads(raw)


def delete(key: str) -> None:
    """Deletes the record under `key` (nothing when there is none)."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=NAMESPACE)


def keys(prefix: str) -> list[str]:
    """The keys of the records whose key starts with `prefix`."""
    from ray.experimental.internal_kv import _internal_kv_list

    return sorted(k.decode() for k in _internal_kv_list(prefix, namespace=NAMESPACE))
