"""Serve's proxy-side bound (`max_queued_requests`): under a burst the proxy itself answers 503 + Retry-After,
the replica's own admission control answers the rest of the excess, and the app keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from _serve import GOOD, free_port

from serve_app.deploy import DeployConfig, serve_artifact


@pytest.fixture(scope="module")
def bounded_app(_ray_clusters, tmp_path_factory):
    from ray import serve

    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    _ray_clusters.ensure("local")
    path = tmp_path_factory.mktemp("bp") / "tiny"
    torch.manual_seed(0)
    save_artifact(build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10)), path, input_shape=(1, 8, 8))
    # One request executing and one waiting per replica (max_ongoing_requests 2), two waiting in the proxy.
    batching = {"max_batch_size": 1, "initial_batch_size": 1, "max_queue_len": 1}
    cfg = DeployConfig(port=free_port(), app={"version": "bp", "batching": batching, "max_queued_requests": 2})
    url = serve_artifact(str(path), cfg)
    yield url
    serve.shutdown()


def test_proxy_answers_503_with_retry_after_beyond_its_bound(ray_local, bounded_app):
    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=bounded_app, timeout=30) as c:
            return await asyncio.gather(*(c.post("/predict", json=GOOD) for _ in range(n)))

    replies = asyncio.run(burst(80))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1
    refused = [r for r in replies if r.status_code == 503]
    assert refused and all(r.headers.get("retry-after") == "1" for r in refused)
    by_proxy = [r for r in refused if "overloaded:" not in r.text]  # the replica's own 503s say "overloaded: ..."
    assert by_proxy, [r.text for r in refused[:3]]
    with httpx.Client(base_url=bounded_app, timeout=30) as c:  # and it keeps serving
        r = c.post("/predict", json=GOOD)
        assert r.status_code == 200 and r.json()["version"] == "bp"
