"""The replica's ASGI app (serve_app/routes.py `Ingress`): the hot routes it answers itself, past FastAPI, answer
exactly what FastAPI's routes answer, byte for byte, for good requests and for every kind of bad one; the other
routes, and the hot ones with `direct_routes` off, go to FastAPI. Driven in-process over ASGI (httpx's
ASGITransport) against a ModelServer run outside Serve."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import httpx
import numpy as np
import pytest
import torch
from _serve import eager_form

from serve_app.config import AppConfig
from serve_app.protocol import HEADER_LENGTH
from serve_app.routes import Ingress, build_api

SHAPE = (1, 8, 8)
LIMIT = 4096
JSON = {"content-type": "application/json"}


@pytest.fixture
def eager(monkeypatch):
    """The replica's fp32 form without timing or compiling the candidates (20 s here): the routes are the subject."""
    import models.fuse

    monkeypatch.setattr(models.fuse, "fastest_inference_module", eager_form)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("routes") / "tiny"
    save_artifact(build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10)), path, input_shape=SHAPE)
    return str(path)


def _image(seed: int) -> list:
    return np.random.default_rng(seed).random(SHAPE[1:]).round(3).tolist()


def _infer(version: str | None = None, name: str = "tandem") -> str:
    return f"/v2/models/{name}/infer" if version is None else f"/v2/models/{name}/versions/{version}/infer"


def _binary_infer() -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(3).random((2, 64), dtype=np.float32)
    head = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": 512}}
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "class"}],
        }
    ).encode()
    return head + x.tobytes(), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def _requests(version: str) -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    """(method, path, body, headers): good requests and every kind of bad one, on the hot routes and beside them."""
    good = json.dumps({"instances": [_image(0), _image(1)]}).encode()
    oip = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})
    binary, binary_headers = _binary_infer()
    return [
        ("POST", "/predict", good, JSON),
        ("POST", "/predict", good, {}),  # no Content-Type: taken as JSON
        ("POST", "/predict", good, {"content-type": "application/json; charset=utf-8"}),
        ("POST", "/predict", gzip.compress(good), {**JSON, "content-encoding": "gzip"}),
        ("POST", "/predict", zlib.compress(good), {**JSON, "content-encoding": "deflate"}),
        ("POST", "/predict", good, {"content-type": "text/plain"}),  # 415
        ("POST", "/predict", good, {**JSON, "content-encoding": "br"}),  # 415
        ("POST", "/predict", b"not gzip", {**JSON, "content-encoding": "gzip"}),  # 400
        ("POST", "/predict", gzip.compress(b" " * (LIMIT + 1)), {**JSON, "content-encoding": "gzip"}),  # 413
        ("POST", "/predict", b" " * (LIMIT + 1), JSON),  # 413 from Content-Length
        ("POST", "/predict", b"{", JSON),  # 400
        ("POST", "/predict", b"[" * 3000 + b"]" * 3000, JSON),  # deep nesting
        ("POST", "/predict", json.dumps({"instances": [[3e38] * 64]}).encode(), JSON),
        ("POST", "/predict", json.dumps({"instances": [[1.0] * 63]}).encode(), JSON),  # 422
        ("POST", "/predict", b"", JSON),
        ("POST", _infer(), oip.encode(), JSON),
        ("POST", _infer(version), oip.encode(), JSON),
        ("POST", _infer("nope"), oip.encode(), JSON),  # 404
        ("POST", _infer(name="other"), oip.encode(), JSON),  # 404
        ("POST", _infer(), binary, binary_headers),  # the binary tensor data extension, a binary output
        ("POST", _infer(), binary, {**binary_headers, HEADER_LENGTH: "9999"}),  # 400
        ("POST", _infer(), oip.encode(), {"content-type": "application/octet-stream"}),  # 415 without the header
        # beside the hot routes: FastAPI answers these either way
        ("POST", "/predict/", good, JSON),  # 307 to /predict
        ("GET", "/predict", None, {}),  # 405
        ("POST", "/v2/models//infer", oip.encode(), JSON),  # 404
        ("POST", "/v2/models/tandem/infer/x", oip.encode(), JSON),  # 404
        ("GET", "/v2/models/tandem/ready", None, {}),
        ("GET", "/v2/health/ready", None, {}),
    ]


def _is_hot(method: str, path: str) -> bool:
    return method == "POST" and (path == "/predict" or (path.endswith("/infer") and "//" not in path))


async def _answers(artifact: str) -> dict[bool, tuple[list[tuple[int, dict[str, str], bytes]], list[str]]]:
    """{direct: (the answers to `_requests` through an `Ingress` with `direct` on or off, the requests FastAPI
    saw)}, both on one ModelServer."""
    from serve_app.replica import ModelServer

    srv = ModelServer(AppConfig(artifact=artifact, max_body_bytes=LIMIT, version="v1").to_dict())
    await srv.reconfigure({"artifact": artifact, "version": "v1", "controller": "unbatched"})
    out = {}
    for direct in (True, False):
        api = build_api(srv, "test")
        seen: list[str] = []

        async def fastapi(scope, receive, send, api=api, seen=seen):
            if scope["type"] == "http":
                seen.append(f"{scope['method']} {scope['path']}")
            await api(scope, receive, send)

        ingress = Ingress(srv, api, direct)
        ingress.api = fastapi  # counts what reaches FastAPI
        answers = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress), base_url="http://t") as c:
            for method, path, body, headers in _requests("v1"):
                r = await c.request(method, path, content=body, headers=headers)
                keep = ("content-type", "content-length", "retry-after", "location", HEADER_LENGTH)
                answers.append((r.status_code, {k: r.headers[k] for k in keep if k in r.headers}, r.content))
        out[direct] = answers, seen
    return out


@pytest.mark.usefixtures("outside_serve", "eager")
def test_direct_routes_answer_what_fastapi_answers(artifact):
    out = asyncio.run(_answers(artifact))
    (direct, seen_direct), (via_fastapi, seen_fastapi) = out[True], out[False]
    requests = _requests("v1")
    for (method, path, _, headers), a, b in zip(requests, direct, via_fastapi, strict=True):
        assert a == b, f"{method} {path} {headers}: direct {a[:2]} {a[2][:200]!r}, FastAPI {b[:2]} {b[2][:200]!r}"
    statuses = [s for s, _, _ in direct]
    # the cases cover what they say: answers, each kind of client error, FastAPI's own 307/404/405
    assert {200, 307, 400, 404, 405, 413, 415, 422} <= set(statuses), statuses
    assert direct[0][0] == 200 and len(json.loads(direct[0][2])["probabilities"]) == 2
    assert direct[19][0] == 200 and int(direct[19][1][HEADER_LENGTH]) < len(direct[19][2])  # binary output
    hot = [f"{m} {p}" for m, p, _, _ in requests if _is_hot(m, p)]
    assert len(hot) == 22 and not set(hot) & set(seen_direct), seen_direct  # direct: FastAPI never saw them
    assert len(seen_direct) == len(requests) - len(hot)
    assert len(seen_fastapi) == len(requests)  # off: every request through FastAPI


@pytest.mark.usefixtures("outside_serve", "eager")
def test_a_chunked_body_is_refused_while_it_streams_in(artifact):
    """Over the limit without a Content-Length: 413 once the running total passes it, the rest never read."""
    from serve_app.replica import ModelServer

    pulled = 0

    async def chunks():
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b" " * 1024

    async def run() -> httpx.Response:
        srv = ModelServer(AppConfig(artifact=artifact, max_body_bytes=LIMIT).to_dict())
        await srv.reconfigure({"artifact": artifact, "controller": "unbatched"})
        transport = httpx.ASGITransport(app=Ingress(srv, build_api(srv, "test"), True))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/predict", content=chunks(), headers=JSON)

    r = asyncio.run(run())
    assert r.status_code == 413 and "at most 4096 bytes" in r.json()["error"]
    assert pulled <= LIMIT // 1024 + 1, pulled


def test_direct_routes_is_a_bool():
    assert AppConfig(artifact="x", direct_routes="false").direct_routes is False
    with pytest.raises(ValueError, match="direct_routes must be a bool"):
        AppConfig(artifact="x", direct_routes="maybe")


def test_the_openapi_document_keeps_every_route(artifact):
    """The hot routes stay in FastAPI's app, so the OpenAPI document (what schemathesis fuzzes) describes them."""
    from serve_app.replica import ModelServer

    spec = build_api(ModelServer(AppConfig(artifact=artifact).to_dict()), "t").openapi()
    assert {"/predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"} <= set(spec["paths"])
    assert (
        "requestBody" in spec["paths"]["/predict"]["post"] and "413" in spec["paths"]["/predict"]["post"]["responses"]
    )
