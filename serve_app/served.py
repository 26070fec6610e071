"""What each model replica serves, as the replica itself reports it: the record behind a roll-out that waits for
the swap rather than for Serve's RUNNING.

A hot update's `reconfigure` returns at once and the replica loads, warms up and swaps in the new model in the
background while the old one serves (serve_app.replica.ModelServer.reconfigure): so Serve's replica state says
nothing about which model answers. Each replica records the user_config it serves (or why the last one could not
be swapped in) under its replica id in the cluster's GCS key-value store once the swap is done;
`wait_served` (serve_app.deploy.roll_out) waits until every replica of a deployment records the target.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from serve_app.config import ModelUserConfig

NAMESPACE = "tandem_serve"
"""GCS key-value namespace of the records (one key per replica: served/{app}/{deployment}/{replica id})."""
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
    return f"served/{app}/{deployment}/{replica_id}"


def publish(app: str, deployment: str, replica_id: str, user_config: ModelUserConfig, error: str | None) -> None:
    """Records that replica `replica_id` serves `user_config` (error None), or failed to swap it in (`error`)
    and goes on serving what it served before."""
    from ray.experimental.internal_kv import _internal_kv_put

    record = {"user_config": normalize(user_config), "error": error, "at": time.time()}
    _internal_kv_put(_key(app, deployment, replica_id), json.dumps(record), overwrite=True, namespace=NAMESPACE)


def read(app: str, deployment: str, replica_id: str) -> dict[str, Any] | None:
    """The replica's last record ({"user_config", "error", "at"}), None when it has none yet."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_key(app, deployment, replica_id), namespace=NAMESPACE)
    return None if raw is None else json.loads(raw)


def wait_served(client, app: str, deployment: str, user_config: dict[str, Any], timeout_s: float = 300.0) -> None:
    """Waits until every replica of `deployment` in `app` is RUNNING and serves `user_config` (swapped in);
    RuntimeError at once when a replica reports it could not swap it in (it serves its previous model),
    TimeoutError after `timeout_s`. `client`: Serve's controller client (serve_app.deploy._ensure_serve)."""
    from ray.serve.schema import ServeInstanceDetails

    target = normalize(user_config)
    deadline = time.monotonic() + timeout_s
    while True:
        details = ServeInstanceDetails(**client.get_serve_details()).applications.get(app)
        d = details.deployments.get(deployment) if details is not None else None
        # a replica on its way out (scale-down, replacement) serves nothing new; none at all (autoscaled to zero)
        # means the next one starts with the target
        replicas = [r for r in d.replicas if r.state != "STOPPING"] if d is not None else []
        if d is not None and not replicas and d.status == "HEALTHY":
            return
        records = {r.replica_id: read(app, deployment, r.replica_id) for r in replicas}
        for rid, rec in records.items():
            if rec is not None and rec["user_config"] == target and rec["error"] is not None:
                raise RuntimeError(
                    f"{deployment} replica {rid} could not swap in {target['artifact']} (it serves its previous"
                    f" model): {rec['error']}"
                )
        swapped = [rid for rid, rec in records.items() if rec is not None and rec["user_config"] == target]
        if replicas and len(swapped) == len(replicas) and all(r.state == "RUNNING" for r in replicas):
            return
        if time.monotonic() > deadline:
            states = {r.replica_id: r.state for r in replicas}
            raise TimeoutError(
                f"{deployment} did not serve {target['artifact']} (version {target['version']}) on every replica"
                f" after {timeout_s:.0f} s: swapped {swapped} of {states}"
            )
        time.sleep(0.2)
