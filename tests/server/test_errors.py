"""Bad input of every kind gets a clear 4xx ``{"error": ...}``; never a 500."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import ApiUser
from .harness import LiveServer


def assert_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in r.text
    return str(body["error"])


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sandboxes"),
        ("POST", "/sandboxes"),
        ("GET", "/sandboxes/x"),
        ("POST", "/sandboxes/x/exec"),
        ("GET", "/ports"),
        ("GET", "/templates"),
        ("POST", "/secrets"),
        ("GET", "/volumes"),
    ],
)
def test_auth_required(anon: httpx.Client, method: str, path: str) -> None:
    assert_error(anon.request(method, path), 401)
    bad = {"Authorization": "Bearer kiln_not-a-real-key"}
    assert_error(anon.request(method, path, headers=bad), 401)
    assert_error(anon.request(method, path, headers={"Authorization": "Token x"}), 401)


def test_malformed_json_is_400(api: ApiUser) -> None:
    for content in (b"{bad json", b'{"name": }', b"\xff\xfe", b"{'single': 1}"):
        for headers in ({"Content-Type": "application/json"}, {}):
            r = api.http.post("/sandboxes", content=content, headers=headers)
            assert "JSON" in assert_error(r, 400)
    r = api.http.post("/sandboxes/x/exec", content=b"nope", headers={"Content-Type": "text/plain"})
    assert_error(r, 400)


@pytest.mark.parametrize(
    "body",
    [
        [1, 2],
        "string",
        {"cpus": "2"},
        {"cpus": 1.5},
        {"cpus": 0},
        {"cpus": 10_000},
        {"memory_mb": 1},
        {"keep_hot": "true"},
        {"env": ["A=B"]},
        {"env": {"A": 1}},
        {"env": {"A=B": "c"}},
        {"name": ""},
        {"name": "../../etc/passwd"},
        {"name": "a/b"},
        {"name": "-leading-dash"},
        {"name": "x" * 64},
        {"name": 5},
        {"secrets": "NAME"},
        {"volumes": [{"name": "v"}]},
        {"volumes": [{"name": "v", "mount": "/"}]},
        {"new_volumes": [{"name": "v", "mount": "/v", "size_mb": -1}]},
        {"image": "../x"},
    ],
)
def test_invalid_fields_are_422(api: ApiUser, body: object) -> None:
    assert_error(api.http.post("/sandboxes", json=body), 422)


def test_unknown_image_tier_is_422(api: ApiUser) -> None:
    # The fake engine accepts any tier; the API itself checks names only.
    r = api.http.post("/sandboxes", json={"image": "no such tier"})
    assert_error(r, 422)


def test_unknown_routes_and_methods(api: ApiUser) -> None:
    assert_error(api.http.get("/nowhere"), 404)
    assert_error(api.http.put("/sandboxes"), 405)
    assert_error(api.http.get("/sandboxes/x/unknown-action"), 404)


def test_405_names_every_method_of_the_path(api: ApiUser) -> None:
    # GET and POST /sandboxes are two route functions; Allow must name both.
    r = api.http.put("/sandboxes")
    assert r.headers["allow"] == "GET, POST"
    r = api.http.post("/sandboxes/some-name")
    assert r.headers["allow"] == "DELETE, GET, PATCH"


def test_openapi_documents_the_json_errors(api: ApiUser) -> None:
    schema = api.http.get("/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorBody"}
    exec_op = schema["paths"]["/sandboxes/{sandbox}/exec"]["post"]
    for code in ("400", "401", "404", "422", "503"):
        assert exec_op["responses"][code]["content"]["application/json"]["schema"] == error
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # never sent


def test_huge_json_bodies_are_413(api: ApiUser, server: LiveServer) -> None:
    big = b'{"name": "' + b"x" * (5 << 20) + b'"}'
    assert_error(api.http.post("/sandboxes", content=big), 413)

    def chunked() -> object:
        for _ in range(6):
            yield b" " * (1 << 20)

    r = api.http.post("/sandboxes", content=chunked())  # type: ignore[arg-type]
    assert_error(r, 413)


def test_bad_content_length_is_400(api: ApiUser, server: LiveServer) -> None:
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            b"POST /sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + api.key.encode()
            + b"\r\nContent-Length: lots\r\n\r\n"
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer  # the status line comes first


def test_bad_query_values_are_4xx(api: ApiUser) -> None:
    api.sandbox(name="q")
    for params in ({"path": "f", "offset": "-1"}, {"path": "f", "limit": "x"}):
        r = api.http.get("/sandboxes/q/files", params=params)
        assert r.status_code in (400, 422)
        assert "error" in r.json()
    assert_error(api.http.get("/sandboxes/q/files", params={"path": "f", "ls": "maybe"}), 400)


def test_engine_unavailable_is_503(api: ApiUser, server: LiveServer) -> None:
    from kiln.engine.errors import EngineUnavailable  # noqa: PLC0415

    original = server.engine.create

    async def unavailable(spec: object) -> object:
        raise EngineUnavailable("qemu-system-x86_64 is not installed")

    server.engine.create = unavailable  # type: ignore[method-assign,assignment]
    try:
        message = assert_error(api.http.post("/sandboxes", json={}), 503)
    finally:
        server.engine.create = original  # type: ignore[method-assign]
    assert "qemu" in message


def test_unexpected_errors_are_a_json_500(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="buggy")
    original = server.engine.stop

    async def broken(sandbox_id: str) -> object:
        raise RuntimeError("a bug")

    server.engine.stop = broken  # type: ignore[method-assign,assignment]
    try:
        r = api.http.post(f"/sandboxes/{sb['id']}/stop")
    finally:
        server.engine.stop = original  # type: ignore[method-assign]
    message = assert_error(r, 500)
    assert "a bug" not in message  # no internals leak to the client


@pytest.mark.parametrize(
    "case",
    [
        ("POST", "/sandboxes", {"memory": 1024}, "memory", "memory_mb"),
        ("POST", "/sandboxes", {"name": "x", "cpu": 2}, "cpu", "cpus"),
        ("POST", "/sandboxes", {"volumes": [{"name": "v", "mnt": "/v"}]}, "mnt", "mount"),
        ("PATCH", "/sandboxes/typo", {"keephot": True}, "keephot", "keep_hot"),
        ("POST", "/sandboxes/typo/exec", {"cmd": ["true"], "timeout": 5}, "timeout", "timeout_s"),
        ("POST", "/sandboxes/typo/exec", {"cmd": ["true"], "tty": True}, "tty", None),
        ("POST", "/templates", {"name": "t", "memory": 512}, "memory", "memory_mb"),
        ("POST", "/secrets", {"name": "A", "value": "b", "user": "root"}, "user", None),
        ("POST", "/volumes", {"name": "v", "size": 10}, "size", "size_mb"),
    ],
)
def test_unknown_fields_are_422_naming_the_field(
    api: ApiUser, case: tuple[str, str, dict[str, object], str, str | None]
) -> None:
    method, path, body, unknown, hint = case
    api.sandbox(name="typo")
    before = api.http.get("/sandboxes").json()
    error = assert_error(api.http.request(method, path, json=body), 422)
    assert f"unknown field {unknown!r}" in error, error
    if hint is not None:
        assert f"did you mean {hint!r}" in error, error
    # Refused means not done, not done without the unknown part.
    assert api.http.get("/sandboxes").json() == before
    assert api.http.get("/templates").json() == []
    assert api.http.get("/secrets").json() == []
    assert api.http.get("/volumes").json() == []


def test_several_unknown_fields_are_all_named(api: ApiUser) -> None:
    error = assert_error(api.http.post("/sandboxes", json={"cpus": 1, "ram": 1, "disk": 2}), 422)
    assert "unknown fields 'ram', 'disk'" in error, error
    assert "known fields: name, cpus, memory_mb" in error, error


def test_openapi_forbids_additional_properties(api: ApiUser) -> None:
    schemas = api.http.get("/openapi.json").json()["components"]["schemas"]
    for name in ("CreateSandbox", "PatchSandbox", "ExecBody", "PutSecret", "CreateVolume"):
        assert schemas[name]["additionalProperties"] is False, name
    assert schemas["ExecBody"]["properties"]["user"]["anyOf"][0]["enum"] == ["root", "sandbox"]
