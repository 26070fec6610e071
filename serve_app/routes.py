"""The HTTP side of the app: `Call` (one request to a route's logic) and `Reply` (its answer), plain data that
crosses a handle (Router -> Model) as well as HTTP, and `http_routes`, the FastAPI routes as thin shims over
`respond(Call)` shared by the Model ingress and the canary Router. Errors FastAPI answers itself are turned into
the protocol's `{"error": message}` too."""

# No `from __future__ import annotations` here: Serve rebuilds the ingress routes' signatures outside this
# module, where FastAPI could not resolve the string annotation "Request".

import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
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
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> "Reply":
        return cls(status, {"error": message}, headers or {})

    def response(self) -> Response:
        if self.raw is not None:
            return Response(self.raw, status_code=self.status, headers=self.headers, media_type=self.media_type)
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def http_routes(api: FastAPI) -> type:
    """A mixin class whose methods are the HTTP routes on `api`, each a thin shim over
    `await self.respond(Call(...))`: the Model ingress answers itself, the canary Router forwards.
    (`@serve.ingress` binds routes whose endpoint's qualname lies in the class's MRO, hence a class.)"""
    _error_format(api)
    body_route = {"responses": {200: {"description": "OK"}, **ERROR_RESPONSES}}
    get_route = {"responses": {200: {"description": "OK"}, **{k: ERROR_RESPONSES[k] for k in (404, 500, 503)}}}

    class Routes:
        async def _call(
            self,
            route: str,
            request: Request | None = None,
            name: str | None = None,
            version: str | None = None,
        ) -> Response:
            body, header_length = b"", None
            if request is not None:
                limit = self.cfg.max_body_bytes
                header_length = request.headers.get(HEADER_LENGTH) if route == "infer" else None
                try:
                    check_content_type(request.headers.get("content-type"), header_length is not None)
                    body = await read_body(request.stream(), request.headers.get("content-length"), limit)
                    body = decode_body(body, request.headers.get("content-encoding"), limit)
                except BadRequest as e:
                    return Reply.error(e.status, str(e)).response()
                except ClientDisconnect:  # the client gave up (its timeout) before sending the whole body
                    return Reply.error(499, "client disconnected").response()
            reply = await self.respond(Call(route, body, name, version, header_length))
            return reply.response()

        @api.post("/predict", openapi_extra=PREDICT_BODY, **body_route)
        async def predict(self, request: Request) -> Response:
            return await self._call("predict", request)

        @api.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY, **body_route)
        async def infer_route(self, name: str, request: Request) -> Response:
            return await self._call("infer", request, name)

        @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, **body_route)
        async def infer_version(self, name: str, version: str, request: Request) -> Response:
            return await self._call("infer", request, name, version)

        @api.get("/v2/health/live", **get_route)
        async def live(self) -> Response:
            return await self._call("live")

        @api.get("/v2/health/ready", **get_route)
        async def ready(self) -> Response:
            return await self._call("ready")

        @api.get("/v2", **get_route)
        async def server_metadata(self) -> Response:
            return await self._call("server_metadata")

        @api.post("/v2/repository/index", **get_route)
        async def repository_index(self) -> Response:
            return await self._call("repository_index")

        @api.get("/v2/models/stats", **get_route)
        async def all_stats(self) -> Response:
            return await self._call("all_stats")

        @api.get("/v2/models/{name}", **get_route)
        async def model_metadata(self, name: str) -> Response:
            return await self._call("model_metadata", None, name)

        @api.get("/v2/models/{name}/versions/{version}", **get_route)
        async def model_metadata_version(self, name: str, version: str) -> Response:
            return await self._call("model_metadata", None, name, version)

        @api.get("/v2/models/{name}/ready", **get_route)
        async def model_ready(self, name: str) -> Response:
            return await self._call("model_ready", None, name)

        @api.get("/v2/models/{name}/versions/{version}/ready", **get_route)
        async def model_ready_version(self, name: str, version: str) -> Response:
            return await self._call("model_ready", None, name, version)

        @api.get("/v2/models/{name}/config", **get_route)
        async def model_config_route(self, name: str) -> Response:
            return await self._call("model_config", None, name)

        @api.get("/v2/models/{name}/versions/{version}/config", **get_route)
        async def model_config_version(self, name: str, version: str) -> Response:
            return await self._call("model_config", None, name, version)

        @api.get("/v2/models/{name}/stats", **get_route)
        async def model_stats(self, name: str) -> Response:
            return await self._call("model_stats", None, name)

        @api.get("/v2/models/{name}/versions/{version}/stats", **get_route)
        async def model_stats_version(self, name: str, version: str) -> Response:
            return await self._call("model_stats", None, name, version)

    return Routes


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
