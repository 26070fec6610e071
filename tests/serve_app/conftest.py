"""The live Serve tests run through HAProxy, tandem's default ingress (see _serve.haproxy_cluster)."""

from __future__ import annotations

import pytest
from _serve import haproxy_cluster


@pytest.fixture
def ray_local(_ray_clusters):
    """Overrides tests/conftest.py's `ray_local` for these tests: the one-node Ray, with the HAProxy ingress."""
    return haproxy_cluster(_ray_clusters)
