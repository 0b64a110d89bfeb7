"""The FastAPI application: routes, JSON errors and request size limits.

Every error leaves as ``{"error": "<message>"}`` with the contract's status:
:class:`~kiln.server.errors.ApiError` and the errors of the store, engine,
agent client and image builder through :func:`~kiln.server.errors.to_api_error`;
FastAPI's validation errors as 400 (malformed JSON) or 422 (invalid fields);
Starlette's 404/405 as they are. Anything else is a bug: a 500 with a generic
message, the traceback in the daemon's log only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import kiln
from kiln.agent_client import AgentError
from kiln.api.responses import Health
from kiln.engine.errors import EngineError
from kiln.images import ImageError
from kiln.network.errors import NetworkError
from kiln.protocol import ProtocolError
from kiln.store import StoreError

from .e2b import control as e2b_control
from .e2b import envd, filesystem, process
from .e2b import files as e2b_files
from .errors import ApiError, to_api_error
from .openapi import ERROR_RESPONSES, add_stream_schemas
from .proxy import ProxyFront
from .relay import NodePools, RelayFront
from .routes import archive, files, images, processes, publish, resources, sandboxes, shell
from .routes import exec as exec_routes
from .routes import nodes as node_routes
from .services import Services

log = logging.getLogger("kiln.server")

#: JSON request bodies larger than this are refused with 413 (file uploads have
#: their own, configurable limit).
MAX_JSON_BODY = 4 << 20


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the API documents for ``path`` (from the OpenAPI schema)."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        regex, _, _ = compile_path(template)
        if regex.match(path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


#: Error bodies by path prefix, first match first: the E2B API answers in E2B's shape
#: (``{"code", "message"}``); everything else in kiln's ``{"error"}``.
ERROR_FORMATS: tuple[tuple[str, Callable[[int, str], JSONResponse]], ...] = (
    (e2b_control.PREFIX, e2b_control.error_response),
)


def operation_id(route: APIRoute) -> str:
    """The route function's name; E2B's routes, which reuse kiln's verbs, prefixed."""
    return f"e2b_{route.name}" if route.path.startswith("/e2b") else route.name


def error_response(status: int, message: str, path: str = "") -> JSONResponse:
    """The error answer for a request to ``path``."""
    for prefix, formatter in ERROR_FORMATS:
        if path == prefix or path.startswith(prefix + "/"):
            return formatter(status, message)
    return JSONResponse({"error": message}, status_code=status)


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """FastAPI's error list → (status, one readable line)."""
    errors = list(exc.errors())
    for err in errors:
        if err.get("type") == "json_invalid":
            return 400, "request body is not valid JSON"
    messages = []
    for err in errors[:5]:
        where = _field_path(err.get("loc", ()))
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid value"))
        if kind == "missing":
            msg = "field required"
        if kind == "model_attributes_type" and not where:
            messages.append("request body must be a JSON object")
            continue
        messages.append(f"{where}: {msg}" if where else msg)
    in_query = any(err.get("loc", ("",))[0] in ("query", "path") for err in errors)
    return (400 if in_query else 422), "; ".join(messages) or "invalid request"


class BodyLimit:
    """Refuse request bodies over a limit with 413, before or while they are read;
    treat every body except a file upload as JSON.

    ``PUT .../files`` gets the upload limit (the route also insists on
    Content-Length, 411); ``PUT .../archive`` none (a tar stream as long as the
    sandbox's disk allows, extracted as it arrives); everything else the small
    JSON limit.
    """

    def __init__(self, app: ASGIApp, upload_limit: int, json_limit: int = MAX_JSON_BODY) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.json_limit = json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS")
            # E2B's envd speaks its own content types and sets its own limits.
            or scope["path"].startswith(envd.PREFIX + "/")
            or (scope["method"] == "PUT" and scope["path"].endswith("/archive"))
        ):
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "PUT" and scope["path"].endswith("/files")
        limit = self.upload_limit if upload else self.json_limit
        length: int | None = None
        headers: list[tuple[bytes, bytes]] = []
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    answer = error_response(400, "invalid Content-Length", scope["path"])
                    answer.headers["connection"] = "close"
                    await answer(scope, receive, send)
                    return
            if key == b"content-type" and not upload:
                continue
            headers.append((key, value))
        if not upload:
            # Every other body is JSON whatever the client labelled it (curl -d says
            # form-urlencoded), so a malformed one is a 400 and a good one is read.
            headers.append((b"content-type", b"application/json"))
            scope = dict(scope, headers=headers)
        if length is not None and length > limit:
            message = f"request body of {length} bytes exceeds the limit of {limit} bytes"
            answer = error_response(413, message, scope["path"])
            # The announced body is never read, so the connection cannot carry another
            # request: say so, and the server closes it after the answer.
            answer.headers["connection"] = "close"
            await answer(scope, receive, send)
            return
        if length is not None:
            await self.app(scope, receive, send)
            return

        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI passes HTTPException through while reading a body (it
                    # turns anything else into a 400).
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


class CatchAll:
    """A bug in a route becomes a JSON 500 (traceback to the log only), and the
    connection stays usable. After the response has started nothing can be sent;
    the exception then goes on to the server, which drops the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            message = f"internal error ({type(exc).__name__})"
            response = error_response(500, message, scope.get("path", ""))
            await response(scope, receive, send)


def create_app(services: Services) -> FastAPI:
    """The API over ``services`` (see :class:`~kiln.server.services.Services`)."""
    app = FastAPI(
        title="kiln",
        version=kiln.__version__,
        description="Self-hosted microVM sandboxes: the daemon's HTTP API.",
        docs_url="/docs",
        redoc_url="/redoc",
        # Operation ids are the route functions' names (create_sandbox, not
        # create_sandbox_sandboxes_post): what generated clients call their methods.
        generate_unique_id_function=operation_id,
    )
    app.state.services = services

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_stream_schemas(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way

    @app.get("/health", tags=["daemon"], response_model=Health)
    async def health() -> dict[str, Any]:
        """Liveness, without authentication; never wakes a sandbox."""
        return services.health()

    for router in (
        sandboxes.router,
        exec_routes.router,
        processes.router,
        files.router,
        archive.router,
        publish.router,
        resources.router,
        images.router,
        node_routes.router,
    ):
        app.include_router(router, responses=ERROR_RESPONSES)
    app.include_router(shell.router)
    app.include_router(e2b_control.router)
    app.include_router(envd.router)
    app.include_router(e2b_files.router)
    # After every route of its own: the Connect services take the rest of /e2b/envd.
    app.mount(envd.PREFIX, envd.envd_app(services, [process.service, filesystem.service]))

    @app.exception_handler(envd.EnvdHttpError)
    async def envd_http_error(request: Request, exc: envd.EnvdHttpError) -> JSONResponse:
        return envd.envd_error_response(exc)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = validation_message(exc)
        return error_response(status, message, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        response = error_response(exc.status_code, message, request.url.path)
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            # Starlette names only the first route whose path matched; several routes
            # share a path here (GET and POST /sandboxes are two functions).
            response.headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return response

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        message = "the client disconnected before the request was complete"
        return error_response(400, message, request.url.path)

    async def known(request: Request, exc: Exception) -> JSONResponse:
        api = to_api_error(exc)
        if api is None:  # pragma: no cover - every root class below maps
            raise exc
        if api.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, api.message)
        return error_response(api.status, api.message, request.url.path)

    for root in (StoreError, EngineError, AgentError, ImageError, NetworkError, ProtocolError):
        app.add_exception_handler(root, known)

    app.add_middleware(BodyLimit, upload_limit=services.config.max_upload_bytes)
    # Before the body limit: proxied bodies stream through whatever their size.
    app.add_middleware(ProxyFront, services=services)
    # Outermost but for CatchAll: a sandbox on another node is relayed there whole.
    # Its connections to the other nodes are closed by whoever runs the app, once
    # the server has stopped (app.state.node_pools.aclose()).
    app.state.node_pools = NodePools()
    app.add_middleware(
        RelayFront, services=services, errors=error_response, pools=app.state.node_pools
    )
    app.add_middleware(CatchAll)
    return app
