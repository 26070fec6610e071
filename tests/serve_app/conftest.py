"""The live Serve tests run through HAProxy, tandem's default ingress (see _serve.haproxy_cluster)."""

from __future__ import annotations

import time

import pytest
from _serve import client_process, haproxy_cluster


@pytest.fixture
def ray_local(_ray_clusters):
    """Overrides tests/conftest.py's `ray_local` for these tests: the one-node Ray, with the HAProxy ingress."""
    return haproxy_cluster(_ray_clusters)


@pytest.fixture(scope="module")
def generator():
    """A process of its own for a test's load generator (_serve.start_load, serve_app.loadgen.run_load_at): in a
    thread of the test's process it shares the GIL with a hot update's client work there, and a stall of it
    sends a burst that HAProxy's per-replica cap rightly refuses (tests/serve_app/test_loadgen.py); the
    hot-update tests count the update's losses. At Ray's worker niceness, as the replica runs
    (_serve.client_process: at nice 0 the generator starves it)."""
    with client_process() as pool:
        pool.submit(time.sleep, 0).result()  # started before the first timed load
        yield pool


@pytest.fixture
def outside_serve(monkeypatch):
    """For ModelServer objects run here, outside Serve: the batch queue's check against the replica's
    max_ongoing_requests needs a replica context, and @serve.batch keeps one queue per decorated method (one
    replica per process in Serve), bound to the event loop of its first call: a fresh one for each test."""
    from ray.serve import batching

    from serve_app.replica import ModelServer

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    monkeypatch.setattr(ModelServer._batched.set_max_batch_size.__self__, "_queue", None)
