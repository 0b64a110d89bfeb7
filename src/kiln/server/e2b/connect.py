"""Connect RPC services over ASGI, with messages in proto3 JSON form as plain dicts.

The protocol itself (unary ``application/json``, enveloped
``application/connect+json`` streams with their end-of-stream message, error
JSON and its HTTP status, ``connect-timeout-ms``, gzip) is connectrpc's server;
this module adds what kiln needs around it:

- a :class:`Service` is a name and its methods, each registered with a
  decorator for its kind (unary, server streaming, client streaming); a handler
  gets the call's context (whatever ``bind`` made of the request: for envd the
  sandbox, its agent and the user) and the request message as a dict;
- a JSON codec that decodes to dicts (no generated protobuf classes: the JSON
  mapping is all the E2B SDK speaks), refusing what is not a JSON object;
- requests connectrpc would answer with an empty body or a 500 (unknown
  method, another HTTP method, a content type without a codec here, gRPC) get
  a Connect error JSON with a 4xx status instead;
- the deadline of ``connect-timeout-ms`` is enforced (``deadline_exceeded``);
- kiln's own errors (store, engine, agent, API errors) leave as Connect codes
  (:func:`connect_error`); anything else is a bug and stays one.

Usage::

    svc: Service[Ctx] = Service("process.Process")

    @svc.unary("List")
    async def list_(ctx: Ctx, request: Message) -> Message: ...

    @svc.server_stream("Start")
    async def start(ctx: Ctx, request: Message) -> AsyncIterator[Message]: ...

    @svc.client_stream("StreamInput")
    async def stream_input(ctx: Ctx, requests: AsyncIterator[Message]) -> Message: ...

    app = ConnectApp([svc], bind=make_ctx)   # an ASGI app; mount it anywhere
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from connectrpc._server_shared import EndpointClientStream, EndpointServerStream, EndpointUnary
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from starlette.types import Receive, Scope, Send

from ..errors import to_api_error

__all__ = [
    "MAX_MESSAGE",
    "Code",
    "ConnectApp",
    "ConnectError",
    "Kind",
    "Message",
    "Service",
    "connect_error",
]

#: A message in proto3 JSON form: camelCase keys, int64 as strings, bytes as base64.
Message = dict[str, Any]
Ctx = TypeVar("Ctx")

#: Largest request message (after decompression). Stdin and file chunks travel
#: base64 in JSON; the SDK sends far less than this per message.
MAX_MESSAGE = 8 << 20

UNARY_TYPE = "application/json"
STREAM_TYPE = "application/connect+json"

#: HTTP status of a kiln API error → the Connect code the E2B SDK maps back.
_CODES: Mapping[int, Code] = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    409: Code.FAILED_PRECONDITION,
    411: Code.INVALID_ARGUMENT,
    413: Code.RESOURCE_EXHAUSTED,
    422: Code.INVALID_ARGUMENT,
    502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}
#: Connect code → HTTP status, for the errors answered here before connectrpc runs.
_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.UNAUTHENTICATED: 401,
    Code.NOT_FOUND: 404,
    Code.UNIMPLEMENTED: 404,
    Code.UNAVAILABLE: 503,
}


def connect_error(exc: BaseException) -> ConnectError | None:
    """The Connect error for an exception a handler met; None for an unknown one (a bug)."""
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, TimeoutError):
        return ConnectError(Code.DEADLINE_EXCEEDED, "the call's deadline passed")
    api = to_api_error(exc)
    if api is None:
        return None
    return ConnectError(_CODES.get(api.status, Code.INTERNAL), api.message)


class Kind(Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"


@dataclass(frozen=True, slots=True)
class Method(Generic[Ctx]):
    name: str
    kind: Kind
    handler: Callable[[Ctx, Any], Any]


class Service(Generic[Ctx]):
    """A Connect service (``package.Service``) and its methods."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.methods: dict[str, Method[Ctx]] = {}

    def _add(self, name: str, kind: Kind, handler: Callable[[Ctx, Any], Any]) -> None:
        if name in self.methods:
            raise ValueError(f"{self.name}/{name} is registered twice")
        self.methods[name] = Method(name, kind, handler)

    def unary(
        self, name: str
    ) -> Callable[
        [Callable[[Ctx, Message], Awaitable[Message]]], Callable[[Ctx, Message], Awaitable[Message]]
    ]:
        def register(
            fn: Callable[[Ctx, Message], Awaitable[Message]],
        ) -> Callable[[Ctx, Message], Awaitable[Message]]:
            self._add(name, Kind.UNARY, fn)
            return fn

        return register

    def server_stream(
        self, name: str
    ) -> Callable[
        [Callable[[Ctx, Message], AsyncIterator[Message]]],
        Callable[[Ctx, Message], AsyncIterator[Message]],
    ]:
        def register(
            fn: Callable[[Ctx, Message], AsyncIterator[Message]],
        ) -> Callable[[Ctx, Message], AsyncIterator[Message]]:
            self._add(name, Kind.SERVER_STREAM, fn)
            return fn

        return register

    def client_stream(
        self, name: str
    ) -> Callable[
        [Callable[[Ctx, AsyncIterator[Message]], Awaitable[Message]]],
        Callable[[Ctx, AsyncIterator[Message]], Awaitable[Message]],
    ]:
        def register(
            fn: Callable[[Ctx, AsyncIterator[Message]], Awaitable[Message]],
        ) -> Callable[[Ctx, AsyncIterator[Message]], Awaitable[Message]]:
            self._add(name, Kind.CLIENT_STREAM, fn)
            return fn

        return register


class JsonCodec:
    """proto3 JSON ⇄ dict. Unknown fields are the handler's business (ignored by
    the message helpers), as the SDK's own codec ignores them."""

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Message:
        if not data:
            return {}  # an empty body is the empty message
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, f"message is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"message must be a JSON object, got {type(value).__name__}"
            )
        return value


_AnyEndpoint = (
    EndpointUnary[Message, Message]
    | EndpointServerStream[Message, Message]
    | EndpointClientStream[Message, Message]
)


def _remaining(ctx: RequestContext[Any, Any]) -> float | None:
    ms = ctx.timeout_ms
    return None if ms is None else max(ms, 0.0) / 1000


def _translate(exc: Exception) -> Exception:
    err = connect_error(exc)
    return exc if err is None else err


def _endpoint(
    service: str,
    method: Method[Ctx],
    bind: Callable[[RequestContext[Any, Any]], Awaitable[Ctx]],
) -> _AnyEndpoint:
    info: MethodInfo[Message, Message] = MethodInfo(
        name=method.name,
        service_name=service,
        input=dict,
        output=dict,
        idempotency_level=IdempotencyLevel.UNKNOWN,
    )
    handler = method.handler
    if method.kind is Kind.SERVER_STREAM:

        async def stream(request: Message, ctx: RequestContext[Any, Any]) -> AsyncIterator[Message]:
            remaining = _remaining(ctx)
            deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
            responses: AsyncIterator[Message] | None = None
            try:
                # The deadline covers each wait for the handler, never a yield: a
                # timeout scope open across a yield would cancel whatever the
                # consumer awaits at that moment.
                async with asyncio.timeout_at(deadline):
                    call = await bind(ctx)
                responses = handler(call, request)
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            message = await anext(responses)
                    except StopAsyncIteration:
                        return
                    yield message
            except Exception as exc:
                raise _translate(exc) from exc
            finally:
                aclose = getattr(responses, "aclose", None)
                if aclose is not None:
                    await aclose()

        return Endpoint.server_stream(method=info, function=stream)

    async def single(request: Any, ctx: RequestContext[Any, Any]) -> Message:
        try:
            async with asyncio.timeout(_remaining(ctx)):
                call = await bind(ctx)
                result: Message = await handler(call, request)
                return result
        except Exception as exc:
            raise _translate(exc) from exc

    if method.kind is Kind.CLIENT_STREAM:
        return Endpoint.client_stream(method=info, function=single)
    return Endpoint.unary(method=info, function=single)


class _Application(ConnectASGIApplication[None]):
    def __init__(self, endpoints: Mapping[str, _AnyEndpoint]) -> None:
        super().__init__(
            service=None,
            endpoints=lambda _: endpoints,
            read_max_bytes=MAX_MESSAGE,
            codecs=[JsonCodec()],
        )

    @property
    def path(self) -> str:  # pragma: no cover - only for generated single-service apps
        return "/"


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


async def send_error(send: Send, status: int, code: Code, message: str) -> None:
    """A Connect error as a whole HTTP response (before anything was streamed)."""
    body = json.dumps({"code": code.value, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ConnectApp(Generic[Ctx]):
    """An ASGI app serving ``POST <root>/<package.Service>/<Method>`` for ``services``.

    ``bind`` turns a request's context (headers, deadline) into the handlers'
    context; it runs inside the call, so the Connect errors it raises (unknown
    sandbox, bad token) reach the client as any handler's would.
    """

    def __init__(
        self,
        services: Iterable[Service[Ctx]],
        bind: Callable[[RequestContext[Any, Any]], Awaitable[Ctx]],
    ) -> None:
        self.methods: dict[str, Method[Ctx]] = {}
        endpoints: dict[str, _AnyEndpoint] = {}
        for service in services:
            for method in service.methods.values():
                path = f"/{service.name}/{method.name}"
                if path in self.methods:
                    raise ValueError(f"{path} is registered twice")
                self.methods[path] = method
                endpoints[path] = _endpoint(service.name, method, bind)
        self._app = _Application(endpoints)

    def method_path(self, scope: Scope) -> str:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan or WebSocket here; the parent app owns those
        path = self.method_path(scope)
        method = self.methods.get(path)
        if method is None:
            await send_error(send, 404, Code.UNIMPLEMENTED, f"unknown method {path.lstrip('/')!r}")
            return
        if scope["method"] != "POST":
            text = f"{path.lstrip('/')} takes POST, not {scope['method']}"
            await send_error(send, 405, Code.UNIMPLEMENTED, text)
            return
        content_type = ""
        for key, value in scope.get("headers", ()):
            if key == b"content-type":
                content_type = _media_type(value.decode("latin-1"))
        wanted = UNARY_TYPE if method.kind is Kind.UNARY else STREAM_TYPE
        if content_type != wanted:
            text = f"content-type {content_type or '(none)'!r} is not supported here; use {wanted}"
            await send_error(send, 415, Code.INVALID_ARGUMENT, text)
            return
        await self._app(scope, receive, send)
