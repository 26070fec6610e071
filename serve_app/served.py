"""What each model replica serves, as the replica itself reports it: the record behind a roll-out that waits for
the swap rather than for Serve's RUNNING.

A hot update's `reconfigure` returns at once and the replica loads, warms up and swaps in the new model in the
background while the old one serves (serve_app.replica.ModelServer.reconfigure): so Serve's replica state says
nothing about which model answers. Each replica records the user_config it serves (or why the last one could not
be swapped in) under its replica id in the cluster's GCS key-value store (serve_app/records.py) once the swap is
done, and deletes its record when Serve stops it (`forget`); serve_app.deploy.wait_served waits until every
replica of a deployment records the target.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from serve_app import records
from serve_app.config import ModelUserConfig

LOAD_DELAY_KEY = "_test_load_delay_s"
"""A user_config key for tests only: seconds the replica sleeps in its background load, so that a test can hold a
hot update's load open under traffic (tests/serve_app/test_backpressure.py). Not a ModelUserConfig field: no
deployment asks for a slow load."""
MAX_LOAD_DELAY_S = 60.0


def split_load_delay(user_config: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """(user_config without the test-only LOAD_DELAY_KEY, that delay in seconds, 0 when absent)."""
    rest = {k: v for k, v in user_config.items() if k != LOAD_DELAY_KEY}
    delay = user_config.get(LOAD_DELAY_KEY, 0.0)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= MAX_LOAD_DELAY_S:
        raise ValueError(f"{LOAD_DELAY_KEY} must be a number of seconds in [0, {MAX_LOAD_DELAY_S:g}], got {delay!r}")
    return rest, float(delay)


def normalize(user_config: dict[str, Any] | ModelUserConfig) -> dict[str, Any]:
    """A user_config as a replica records it: every field (defaults filled in), in JSON's types."""
    if not isinstance(user_config, ModelUserConfig):
        user_config = ModelUserConfig.from_dict(split_load_delay(user_config)[0])
    return json.loads(json.dumps(asdict(user_config)))


def _key(app: str, deployment: str, replica_id: str) -> str:
    return f"served/{app}/{deployment}/{replica_id}"  # one record per replica


def publish(app: str, deployment: str, replica_id: str, user_config: ModelUserConfig, error: str | None) -> None:
    """Records that replica `replica_id` serves `user_config` (error None), or failed to swap it in (`error`)
    and goes on serving what it served before."""
    record = {"user_config": normalize(user_config), "error": error, "at": time.time()}
    records.put(_key(app, deployment, replica_id), record)


def read(app: str, deployment: str, replica_id: str) -> dict[str, Any] | None:
    """The replica's last record ({"user_config", "error", "at"}), None when it has none yet."""
    return records.get(_key(app, deployment, replica_id))


def forget(app: str, deployment: str, replica_id: str) -> None:
    """Deletes the replica's record (it stops: scaled down, replaced, its app deleted, Serve shut down)."""
    records.delete(_key(app, deployment, replica_id))


def replica_ids(app: str, deployment: str) -> list[str]:
    """The ids of the replicas of `deployment` in `app` that have a record."""
    prefix = _key(app, deployment, "")
    return [k[len(prefix) :] for k in records.keys(prefix)]
