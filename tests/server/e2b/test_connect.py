"""The Connect layer on real HTTP: uvicorn serving a test service, raw httpx requests.

Envelopes and error bodies are built and parsed here by hand, after the
Connect protocol's own description, not with the module under test.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from connectrpc.request import RequestContext

from kiln.server.daemon import bind_socket
from kiln.server.e2b.connect import MAX_MESSAGE, Code, ConnectApp, ConnectError, Message, Service
from kiln.server.errors import NotFoundError

STREAM = "application/connect+json"

svc: Service[str] = Service("test.Echo")


@svc.unary("Say")
async def say(who: str, request: Message) -> Message:
    if request.get("fail"):
        raise ConnectError(Code.FAILED_PRECONDITION, "asked to fail")
    if request.get("missing"):
        raise NotFoundError("no such thing")  # a kiln API error: becomes not_found
    if request.get("sleep"):
        await asyncio.sleep(float(request["sleep"]))
    return {"text": request.get("text", ""), "who": who}


@svc.server_stream("Count")
async def count(who: str, request: Message) -> AsyncIterator[Message]:
    for i in range(int(request.get("n", 0))):
        if request.get("failAt") == i:
            raise ConnectError(Code.NOT_FOUND, f"gone at {i}")
        yield {"i": i}
        if request.get("sleep"):
            await asyncio.sleep(float(request["sleep"]))


@svc.client_stream("Sum")
async def total(who: str, requests: AsyncIterator[Message]) -> Message:
    n = 0
    async for message in requests:
        n += int(message.get("n", 0))
    return {"sum": n}


async def bind(ctx: RequestContext[Any, Any]) -> str:
    who = ctx.request_headers.get("x-who")
    if who is None:
        raise ConnectError(Code.UNAUTHENTICATED, "who are you?")
    return who


class _Server:
    def __init__(self) -> None:
        self.url = ""
        self._ready = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        sock = bind_socket("127.0.0.1", 0)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(
            ConnectApp([svc], bind), lifespan="off", log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # noqa: ASYNC110 - uvicorn offers no event
            await asyncio.sleep(0.01)
        self._ready.set()
        await task

    def __enter__(self) -> _Server:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with _Server() as server, httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def envelope(obj: Any, flags: int = 0) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack(">BI", flags, len(body)) + body


def envelopes(data: bytes) -> list[tuple[int, Any]]:
    out = []
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        out.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return out


WHO = {"x-who": "tester"}


# ---------------------------------------------------------------- unary


def test_unary_round_trip(http: httpx.Client) -> None:
    r = http.post("/test.Echo/Say", json={"text": "héllo"}, headers=WHO)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"text": "héllo", "who": "tester"}


def test_unary_empty_body_is_the_empty_message(http: httpx.Client) -> None:
    r = http.post(
        "/test.Echo/Say", content=b"", headers={**WHO, "content-type": "application/json"}
    )
    assert r.status_code == 200
    assert r.json() == {"text": "", "who": "tester"}


@pytest.mark.parametrize(
    ("body", "code", "status"),
    [
        ({"fail": True}, "failed_precondition", 400),
        ({"missing": True}, "not_found", 404),
    ],
)
def test_unary_errors_are_connect_errors(
    http: httpx.Client, body: dict[str, Any], code: str, status: int
) -> None:
    r = http.post("/test.Echo/Say", json=body, headers=WHO)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.json()["code"] == code
    assert r.json()["message"]


def test_bind_error_reaches_the_client(http: httpx.Client) -> None:
    r = http.post("/test.Echo/Say", json={})
    assert r.status_code == 401
    assert r.json() == {"code": "unauthenticated", "message": "who are you?"}


@pytest.mark.parametrize(
    "body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"null"], ids=repr
)
def test_unary_bad_json_is_invalid_argument(http: httpx.Client, body: bytes) -> None:
    r = http.post(
        "/test.Echo/Say", content=body, headers={**WHO, "content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_argument"


def test_unknown_method_and_service(http: httpx.Client) -> None:
    for path in ("/test.Echo/Shout", "/nope.Nope/Say", "/", "/test.Echo"):
        r = http.post(path, json={}, headers=WHO)
        assert r.status_code == 404, path
        assert r.json()["code"] == "unimplemented"


def test_wrong_http_method(http: httpx.Client) -> None:
    r = http.get("/test.Echo/Say", headers=WHO)
    assert r.status_code == 405
    assert r.json()["code"] == "unimplemented"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/proto", "application/grpc", "application/grpc-web", ""],
)
def test_unsupported_content_type(http: httpx.Client, content_type: str) -> None:
    r = http.post("/test.Echo/Say", content=b"{}", headers={**WHO, "content-type": content_type})
    assert r.status_code == 415
    assert r.json()["code"] == "invalid_argument"


def test_stream_method_needs_the_stream_content_type(http: httpx.Client) -> None:
    r = http.post("/test.Echo/Count", json={"n": 1}, headers=WHO)
    assert r.status_code == 415


def test_oversized_message(http: httpx.Client) -> None:
    big = {"text": "x" * (MAX_MESSAGE + 10)}
    r = http.post("/test.Echo/Say", json=big, headers=WHO)
    assert r.status_code == 429
    assert r.json()["code"] == "resource_exhausted"


def test_gzip_request_and_response(http: httpx.Client) -> None:
    body = gzip.compress(json.dumps({"text": "zipped"}).encode())
    r = http.post(
        "/test.Echo/Say",
        content=body,
        headers={
            **WHO,
            "content-type": "application/json",
            "content-encoding": "gzip",
            "accept-encoding": "gzip",
        },
    )
    assert r.status_code == 200
    assert r.json() == {"text": "zipped", "who": "tester"}  # httpx undoes the gzip


def test_unknown_compression_is_refused(http: httpx.Client) -> None:
    r = http.post(
        "/test.Echo/Say",
        content=b"{}",
        headers={**WHO, "content-type": "application/json", "content-encoding": "snappy"},
    )
    assert r.status_code == 501
    assert r.json()["code"] == "unimplemented"


def test_timeout_header(http: httpx.Client) -> None:
    headers = {**WHO, "connect-timeout-ms": "200"}
    r = http.post("/test.Echo/Say", json={"sleep": 5}, headers=headers)
    assert r.status_code == 504
    assert r.json()["code"] == "deadline_exceeded"
    r = http.post("/test.Echo/Say", json={}, headers={**WHO, "connect-timeout-ms": "soon"})
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_argument"


# ---------------------------------------------------------------- streams


def post_stream(http: httpx.Client, path: str, body: bytes, **headers: str) -> httpx.Response:
    return http.post(path, content=body, headers={**WHO, "content-type": STREAM, **headers})


def test_server_stream(http: httpx.Client) -> None:
    r = post_stream(http, "/test.Echo/Count", envelope({"n": 3}))
    assert r.status_code == 200
    assert r.headers["content-type"] == STREAM
    frames = envelopes(r.content)
    assert frames[:3] == [(0, {"i": 0}), (0, {"i": 1}), (0, {"i": 2})]
    flags, end = frames[3]
    assert flags == 2
    assert "error" not in end


def test_server_stream_error_in_end_message(http: httpx.Client) -> None:
    r = post_stream(http, "/test.Echo/Count", envelope({"n": 3, "failAt": 1}))
    assert r.status_code == 200
    frames = envelopes(r.content)
    assert frames[0] == (0, {"i": 0})
    assert frames[-1] == (2, {"error": {"code": "not_found", "message": "gone at 1"}})


def test_stream_bind_error_in_end_message(http: httpx.Client) -> None:
    r = http.post("/test.Echo/Count", content=envelope({"n": 1}), headers={"content-type": STREAM})
    assert r.status_code == 200
    assert envelopes(r.content) == [
        (2, {"error": {"code": "unauthenticated", "message": "who are you?"}})
    ]


def test_server_stream_deadline(http: httpx.Client) -> None:
    r = post_stream(
        http,
        "/test.Echo/Count",
        envelope({"n": 100, "sleep": 0.1}),
        **{"connect-timeout-ms": "350"},
    )
    frames = envelopes(r.content)
    assert 2 <= len(frames) - 1 <= 5
    assert frames[-1][0] == 2
    assert frames[-1][1]["error"]["code"] == "deadline_exceeded"


def test_client_stream(http: httpx.Client) -> None:
    body = b"".join(envelope({"n": n}) for n in (1, 2, 39))
    r = post_stream(http, "/test.Echo/Sum", body)
    assert r.status_code == 200
    assert envelopes(r.content) == [(0, {"sum": 42}), (2, {})]


def test_client_stream_gzip_envelopes(http: httpx.Client) -> None:
    body = envelope(gzip.compress(b'{"n": 5}'), flags=1) + envelope({"n": 1})
    r = post_stream(http, "/test.Echo/Sum", body, **{"connect-content-encoding": "gzip"})
    assert envelopes(r.content) == [(0, {"sum": 6}), (2, {})]


@pytest.mark.parametrize(
    "body",
    [
        envelope(b"{nope"),  # not JSON
        envelope([1, 2]),  # not an object
        envelope(b"{}", flags=1),  # "compressed" without a compression
        struct.pack(">BI", 0, 1 << 30) + b"{}",  # length far over the limit
    ],
    ids=["bad-json", "array", "compressed-flag", "huge-length"],
)
def test_garbage_envelopes(http: httpx.Client, body: bytes) -> None:
    for path in ("/test.Echo/Sum", "/test.Echo/Count"):
        r = post_stream(http, path, body)
        assert r.status_code == 200, path
        flags, end = envelopes(r.content)[-1]
        assert flags == 2
        assert end["error"]["code"] in {"invalid_argument", "internal", "resource_exhausted"}, end


def test_truncated_envelope(http: httpx.Client) -> None:
    r = post_stream(http, "/test.Echo/Count", envelope({"n": 1})[:-2])
    flags, end = envelopes(r.content)[-1]
    assert flags == 2
    assert end["error"]["code"] in {"invalid_argument", "unimplemented"}


def test_unary_takes_only_the_unary_content_type(http: httpx.Client) -> None:
    r = post_stream(http, "/test.Echo/Say", envelope({"text": "hi"}))
    assert r.status_code == 415
    assert "application/json" in r.json()["message"]
