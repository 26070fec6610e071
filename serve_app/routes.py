"""The HTTP side of the app: `Call` (one request to a route's logic) and `Reply` (its answer), plain data that
crosses a handle (Router -> Model) as well as HTTP; `build_api`, the FastAPI routes as thin shims over
`respond(Call)` shared by the Model ingress and the canary Router; and `Ingress`, the replica's ASGI app, which
answers the hot routes (POST /predict, the OIP infer routes) itself and hands the others to FastAPI. Errors
FastAPI answers itself are turned into the protocol's `{"error": message}` too."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from serve_app.protocol import (
    ERROR_RESPONSES,
    HEADER_LENGTH,
    INFER_BODY,
    PREDICT_BODY,
    BadRequest,
    check_content_type,
    decode_body,
    read_body,
)


@dataclass(frozen=True, slots=True)
class Call:
    """One request to a route's logic, plain data so that it crosses a handle (Router -> Model)."""

    route: str
    body: bytes = b""
    name: str | None = None
    """Model name from the path (/v2/models/{name}/...)."""
    version: str | None = None
    """Model version from the path (/v2/models/{name}/versions/{version}/...); None: the current one."""
    header_length: str | None = None
    """Inference-Header-Content-Length (binary tensor data extension)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A route's answer, plain data so that it crosses a handle (Router -> Model) as well as HTTP: a JSON `body`,
    or `raw` bytes of `media_type` (an OIP infer answer with binary tensors)."""

    status: int
    body: dict[str, Any] | list[Any]
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    media_type: str = "application/json"

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, {"error": message}, headers or {})

    def encode(self) -> tuple[bytes, str]:
        """(the body's bytes, its media type); JSON as Starlette's JSONResponse renders it."""
        if self.raw is not None:
            return self.raw, self.media_type
        body = json.dumps(self.body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return body.encode("utf-8"), "application/json"

    def response(self) -> Response:
        body, media_type = self.encode()
        return Response(body, status_code=self.status, headers=self.headers, media_type=media_type)


def build_api(server: Any, title: str) -> FastAPI:
    """The FastAPI app of one replica, its routes thin shims over `await server.respond(Call(...))` (a
    ModelServer answers itself, the canary's RouterServer forwards): built per replica, so the routes close over
    it. Every route is here, with the request bodies and answers the OpenAPI document describes; `Ingress` answers
    the hot ones itself in front of it."""
    api = FastAPI(title=title)
    _error_format(api)
    body_route = {"responses": {200: {"description": "OK"}, **ERROR_RESPONSES}}
    get_route = {"responses": {200: {"description": "OK"}, **{k: ERROR_RESPONSES[k] for k in (404, 500, 503)}}}

    async def call(route: str, request: Request | None = None, name: str | None = None, version: str | None = None):
        if request is None:
            return (await server.respond(Call(route, b"", name, version))).response()
        reply = await read_and_respond(server, route, request.stream(), request.headers, name, version)
        return reply.response()

    @api.post("/predict", openapi_extra=PREDICT_BODY, **body_route)
    async def predict(request: Request) -> Response:
        return await call("predict", request)

    @api.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY, **body_route)
    async def infer_route(name: str, request: Request) -> Response:
        return await call("infer", request, name)

    @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, **body_route)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await call("infer", request, name, version)

    @api.get("/v2/health/live", **get_route)
    async def live() -> Response:
        return await call("live")

    @api.get("/v2/health/ready", **get_route)
    async def ready() -> Response:
        return await call("ready")

    @api.get("/v2", **get_route)
    async def server_metadata() -> Response:
        return await call("server_metadata")

    @api.post("/v2/repository/index", **get_route)
    async def repository_index() -> Response:
        return await call("repository_index")

    @api.get("/v2/models/stats", **get_route)
    async def all_stats() -> Response:
        return await call("all_stats")

    @api.get("/v2/models/{name}", **get_route)
    async def model_metadata(name: str) -> Response:
        return await call("model_metadata", None, name)

    @api.get("/v2/models/{name}/versions/{version}", **get_route)
    async def model_metadata_version(name: str, version: str) -> Response:
        return await call("model_metadata", None, name, version)

    @api.get("/v2/models/{name}/ready", **get_route)
    async def model_ready(name: str) -> Response:
        return await call("model_ready", None, name)

    @api.get("/v2/models/{name}/versions/{version}/ready", **get_route)
    async def model_ready_version(name: str, version: str) -> Response:
        return await call("model_ready", None, name, version)

    @api.get("/v2/models/{name}/config", **get_route)
    async def model_config_route(name: str) -> Response:
        return await call("model_config", None, name)

    @api.get("/v2/models/{name}/versions/{version}/config", **get_route)
    async def model_config_version(name: str, version: str) -> Response:
        return await call("model_config", None, name, version)

    @api.get("/v2/models/{name}/stats", **get_route)
    async def model_stats(name: str) -> Response:
        return await call("model_stats", None, name)

    @api.get("/v2/models/{name}/versions/{version}/stats", **get_route)
    async def model_stats_version(name: str, version: str) -> Response:
        return await call("model_stats", None, name, version)

    return api


async def read_and_respond(
    server: Any,
    route: str,
    chunks: AsyncIterator[bytes],
    headers: Mapping[str, str],
    name: str | None = None,
    version: str | None = None,
) -> Reply:
    """A body route's work, the same whichever way the request came in (FastAPI or `Ingress`): the body's checks
    (Content-Type, bounded while it streams in, gzip/deflate) and then `server.respond`. `headers`: the request's,
    by lower-case name (Starlette's `Headers`, or `_headers`)."""
    limit = server.cfg.max_body_bytes
    header_length = headers.get(HEADER_LENGTH) if route == "infer" else None
    content_length, content_encoding = headers.get("content-length"), headers.get("content-encoding")
    try:
        check_content_type(headers.get("content-type"), header_length is not None)
        body = await read_body(chunks, content_length, limit)
        body = decode_body(body, content_encoding, limit)
    except BadRequest as e:
        return Reply.error(e.status, str(e))
    except ClientDisconnect:  # the client gave up (its timeout) before sending the whole body
        return Reply.error(499, "client disconnected")
    return await server.respond(Call(route, body, name, version, header_length))


class Ingress:
    """The ASGI app of a replica: POST /predict and the OIP infer routes answered here, straight from the ASGI
    messages, everything else (and those too when `direct` is off) by `api`, the FastAPI app.

    Why not FastAPI for all: with a model as light as the serving bench's, the replica's one event loop is the
    limit, and FastAPI's part of a request (its middleware stack, routing through every route's regex, the request
    object, dependency solving for the class-based view, the response object) was ~30 % of that loop's time
    (py-spy, note 17). Answered here, they served 1.45-1.50x the requests/s within the SLO for every controller
    (bench/serve_direct_routes.py, `tiny`, 1 replica, 2 cores). The hot routes do the same checks here
    (`read_and_respond`) and answer the same bytes (`Reply.encode`); tests/serve_app/test_routes.py drives both ways
    with the same requests."""

    def __init__(self, server: Any, api: FastAPI, direct: bool) -> None:
        self.server, self.api, self.direct = server, api, direct

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        hot = self.direct and scope["type"] == "http" and scope["method"] == "POST" and _hot_route(_route_path(scope))
        if not hot:
            await self.api(scope, receive, send)
            return
        route, name, version = hot
        reply = await read_and_respond(self.server, route, _chunks(receive), _headers(scope["headers"]), name, version)
        body, media_type = reply.encode()
        head = [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())]
        head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    def add_exception_handler(self, exc: Any, handler: Callable) -> None:
        """Serve registers its own (BackPressureError: 503) on an app that has this: they go to FastAPI's; the
        hot routes answer every exception themselves (`server.respond`)."""
        self.api.add_exception_handler(exc, handler)


class IngressMixin:
    """`__serve_build_asgi_app__` for `serve.ingress()` without an app: Serve calls it in each replica after the
    constructor, and serves the `Ingress` it returns. `api_title`: the OpenAPI document's title."""

    api_title = "tandem"

    def __serve_build_asgi_app__(self) -> Ingress:
        return Ingress(self, build_api(self, self.api_title), self.cfg.direct_routes)

    @property
    def docs_path(self) -> str:
        """Where Serve's status points for the API docs (it reads a FastAPI app's docs_url itself)."""
        return "/docs"


def _route_path(scope: dict[str, Any]) -> str:
    """The path within the app (Starlette's rule: an app under a route prefix gets its root_path in front)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _hot_route(path: str) -> tuple[str, str | None, str | None] | None:
    """(route, name, version) when `path` is POST /predict or an OIP infer route, else None (FastAPI's path
    parameters: one segment each, not empty)."""
    if path == "/predict":
        return "predict", None, None
    parts = path.split("/")  # "", "v2", "models", name, ["versions", version,] "infer"
    if parts[-1] != "infer" or parts[:3] != ["", "v2", "models"] or not all(parts[3:]):
        return None
    if len(parts) == 5:
        return "infer", parts[3], None
    if len(parts) == 7 and parts[4] == "versions":
        return "infer", parts[3], parts[5]
    return None


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The first value of each header by its name (lower-case in ASGI), as Starlette's `Headers.get` gives it."""
    out: dict[str, str] = {}
    for k, v in raw:
        out.setdefault(k.decode("latin-1"), v.decode("latin-1"))
    return out


async def _chunks(receive: Callable) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive (Starlette's `Request.stream`)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield msg.get("body", b"")
        if not msg.get("more_body", False):
            return


def _error_format(api: FastAPI) -> None:
    """Errors FastAPI answers itself (no such route 404, wrong method 405, bad path parameters 422) in the
    protocol's `{"error": message}` format, as the routes answer theirs (FastAPI's own is `{"detail": ...}`,
    which OIP clients cannot read)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request: Request, exc: HTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return Reply.error(exc.status_code, f"{request.method} {request.url.path}: {detail}", exc.headers).response()

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return Reply.error(422, f"{request.method} {request.url.path}: {exc.errors()}").response()

    api.add_exception_handler(HTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
