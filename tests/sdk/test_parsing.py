"""The SDK's pure parts: request bodies, response parsers, status → exception."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime

import pytest

from kiln.api.responses import parse_time
from kiln.sdk import _api
from kiln.sdk.errors import (
    APIError,
    AuthenticationError,
    Conflict,
    InvalidResponse,
    KilnError,
    NotFound,
    PermissionDenied,
    ServerError,
    Unavailable,
    ValidationError,
    error_for_status,
)
from kiln.sdk.models import (
    Capabilities,
    Exit,
    Health,
    LastBoot,
    NewVolume,
    Port,
    PublishedPort,
    SandboxInfo,
    Stderr,
    Stdout,
    Template,
    Volume,
    VolumeMount,
    parse,
    parse_exec_event,
)
from kiln.sdk.shell import exit_code_from_close, resize_message


def parse_sandbox(data: object) -> SandboxInfo:
    return parse(SandboxInfo, data, "sandbox")


SANDBOX = {
    "id": "sb-1",
    "name": "demo",
    "status": "running",
    "thermal": "warm",
    "ip": "10.88.0.2",
    "cpus": 2,
    "memory_mb": 1024,
    "keep_hot": False,
    "engine": "qemu",
    "image": "minimal",
    "created_at": "2024-05-01T10:00:00Z",
    "last_active_at": "2024-05-01T10:05:00.500000Z",
    "from_the_future": {"ignored": True},
}


def test_parse_sandbox() -> None:
    sb = parse_sandbox(SANDBOX)
    assert (sb.id, sb.name, sb.thermal, sb.cpus, sb.memory_mb) == ("sb-1", "demo", "warm", 2, 1024)
    assert sb.created_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert sb.to_dict()["created_at"] == "2024-05-01T10:00:00+00:00"
    assert "from_the_future" not in sb.to_dict()
    assert {sb, parse_sandbox({**SANDBOX, "labels": {}})} == {sb}  # hashable, labels and all


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": None}, "field 'id': .*string"),
        ({"cpus": "2"}, "field 'cpus': .*integer"),
        ({"keep_hot": 1}, "field 'keep_hot': .*boolean"),
        ({"created_at": "yesterday"}, "RFC 3339"),
    ],
)
def test_parse_sandbox_rejects(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidResponse, match=message):
        parse_sandbox({**SANDBOX, **change})


def test_parse_sandbox_rejects_non_object() -> None:
    with pytest.raises(InvalidResponse, match="expected a JSON object"):
        parse_sandbox([SANDBOX])
    with pytest.raises(InvalidResponse, match="sandbox list: expected a JSON list"):
        parse(list[SandboxInfo], SANDBOX, "sandbox list")
    with pytest.raises(InvalidResponse, match=r"field '1\.name' is missing"):
        parse(list[SandboxInfo], [SANDBOX, {"id": "x", "status": "running"}], "sandbox list")


def test_parse_sandbox_ignores_unknown_fields() -> None:
    sb = parse_sandbox({**SANDBOX, "network": {"egress": "deny", "later": [1]}})
    assert sb.network is not None and sb.network.egress == "deny"


def test_parse_time_accepts_unix_seconds_and_naive() -> None:
    assert parse_time(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_time("2024-01-01T00:00:00") == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_time("2024-01-01T00:00:00.5Z") == datetime(2024, 1, 1, 0, 0, 0, 500000, UTC)


def test_exec_events_text_and_base64() -> None:
    raw = b"\xff\x00bin"
    b64 = base64.b64encode(raw).decode()
    assert parse_exec_event('{"type":"stdout","data":"hi"}') == Stdout(b"hi")
    assert parse_exec_event(f'{{"type":"stderr","data":"{b64}","encoding":"base64"}}') == Stderr(
        raw
    )
    assert parse_exec_event(f'{{"type":"stdout","data":"{b64}"}}', "base64") == Stdout(raw)
    assert parse_exec_event('{"type":"exit","exit_code":7}') == Exit(7)
    assert parse_exec_event('{"type":"exit","exit_code":-9}') == Exit(-9)
    assert parse_exec_event("   ") is None
    assert parse_exec_event('{"type":"progress","pct":5}') is None  # unknown: skipped
    assert Stdout("é".encode()).text == "é"


def test_exec_event_error_line_raises() -> None:
    with pytest.raises(ServerError, match="agent went away"):
        parse_exec_event('{"type":"error","error":"agent went away"}')


@pytest.mark.parametrize(
    "line", ["not json", '["stdout"]', '{"type":"exit"}', '{"type":"stdout","data":"%%"}']
)
def test_exec_event_garbage(line: str) -> None:
    with pytest.raises(InvalidResponse):
        parse_exec_event(line, "base64")


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, ValidationError),
        (401, AuthenticationError),
        (403, PermissionDenied),
        (404, NotFound),
        (409, Conflict),
        (411, ValidationError),
        (413, ValidationError),
        (422, ValidationError),
        (500, ServerError),
        (502, ServerError),
        (503, Unavailable),
        (418, APIError),
    ],
)
def test_error_for_status(status: int, cls: type[APIError]) -> None:
    exc = error_for_status(status, "boom")
    assert type(exc) is cls
    assert isinstance(exc, KilnError)
    assert (str(exc), exc.status_code, exc.message) == ("boom", status, "boom")


def test_unavailable_is_a_server_error() -> None:
    assert isinstance(error_for_status(503, "x"), ServerError)


@pytest.mark.parametrize(
    ("body", "want"),
    [
        (b'{"error":"sandbox x not found"}', "sandbox x not found"),
        (b'{"detail":"Not Found"}', "Not Found"),
        (
            b'{"detail":[{"loc":["body","cpus"],"msg":"too big"},{"loc":["body"],"msg":"bad"}]}',
            "cpus: too big; bad",
        ),
        (b"plain text", "plain text"),
        (b"<html>\n<body>oops</body>\n</html>", "HTTP 502 Bad Gateway"),
        (b"", "HTTP 502 Bad Gateway"),
    ],
)
def test_error_message(body: bytes, want: str) -> None:
    assert _api.error_message(502, body, "Bad Gateway") == want


def test_sandbox_spec_only_sends_what_is_given() -> None:
    assert _api.sandbox_spec() == {}
    spec = _api.sandbox_spec(
        name="a",
        cpus=2,
        keep_hot=False,
        env={"A": "1"},
        secrets=["TOKEN"],
        template="tpl-1",
        volumes={"data": "/data"},
        new_volumes=[NewVolume("cache", 64, "/cache")],
    )
    assert spec == {
        "name": "a",
        "cpus": 2,
        "keep_hot": False,
        "template_id": "tpl-1",
        "env": {"A": "1"},
        "secrets": ["TOKEN"],
        "volumes": [{"name": "data", "mount": "/data"}],
        "new_volumes": [{"name": "cache", "size_mb": 64, "mount": "/cache"}],
    }
    assert _api.sandbox_spec(volumes=[VolumeMount("v", "/v")])["volumes"] == [
        {"name": "v", "mount": "/v"}
    ]
    assert _api.sandbox_spec(engine="docker", runtime="runsc") == {
        "engine": "docker",
        "runtime": "runsc",
    }


def test_parse_sandbox_last_boot() -> None:
    assert parse_sandbox(SANDBOX).last_boot is None  # a daemon from before last_boot
    assert parse_sandbox({**SANDBOX, "last_boot": None}).last_boot is None
    at = "2024-05-01T10:05:00.250000Z"
    sb = parse_sandbox({**SANDBOX, "last_boot": {"reason": "rebooted", "at": at, "later": 1}})
    assert sb.last_boot == LastBoot("rebooted", datetime(2024, 5, 1, 10, 5, 0, 250000, tzinfo=UTC))
    assert sb.to_dict()["last_boot"] == {
        "reason": "rebooted",
        "at": "2024-05-01T10:05:00.250000+00:00",
    }
    for bad, message in (
        ("rebooted", "'last_boot': expected a JSON object"),
        ({"at": at}, "'last_boot.reason' is missing"),
        ({"reason": "created", "at": "soon"}, "RFC 3339"),
    ):
        with pytest.raises(InvalidResponse, match=message):
            parse_sandbox({**SANDBOX, "last_boot": bad})


def test_parse_sandbox_engine_runtime_capabilities() -> None:
    old = parse_sandbox(SANDBOX)  # a daemon from before runtimes and capabilities
    assert (old.engine, old.runtime, old.capabilities) == ("qemu", None, None)
    assert parse_sandbox({**SANDBOX, "capabilities": None}).capabilities is None  # mid-stop
    sb = parse_sandbox(
        {
            **SANDBOX,
            "engine": "docker",
            "runtime": "runsc",
            "capabilities": {"pause": True, "snapshots": False, "later": 1},
        }
    )
    assert (sb.engine, sb.runtime) == ("docker", "runsc")
    assert sb.capabilities == Capabilities(pause=True, snapshots=False)
    assert sb.to_dict()["capabilities"] == {"pause": True, "snapshots": False, "fork": False}
    assert parse_sandbox({**SANDBOX, "capabilities": {}}).capabilities == Capabilities()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"runtime": 1}, "field 'runtime': .*string"),
        ({"capabilities": ["pause"]}, "'capabilities': expected a JSON object"),
        ({"capabilities": {"snapshots": "no"}}, "'capabilities.snapshots': .*boolean"),
    ],
)
def test_parse_sandbox_rejects_bad_engine_fields(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidResponse, match=message):
        parse_sandbox({**SANDBOX, **change})


def test_parse_health_engines() -> None:
    base = {"status": "ok", "sandboxes": 2, "uptime_s": 1.5, "engine": "qemu"}
    assert parse(Health, base).engines == {}  # a daemon with one engine
    health = parse(Health, {**base, "engines": {"qemu": "ok", "docker": "no dockerd"}})
    assert health.engines == {"qemu": "ok", "docker": "no dockerd"}
    assert health.to_dict()["engines"] == {"qemu": "ok", "docker": "no dockerd"}
    with pytest.raises(InvalidResponse, match="engines"):
        parse(Health, {**base, "engines": {"qemu": True}})


def test_exec_body() -> None:
    assert _api.exec_body(["ls", "-l"]) == {"cmd": ["ls", "-l"]}
    assert _api.exec_body("echo $HOME", cwd="/", timeout_s=5, env={"A": "b"}) == {
        "cmd": ["sh", "-c", "echo $HOME"],
        "env": {"A": "b"},
        "cwd": "/",
        "timeout_s": 5,
    }
    with pytest.raises(ValueError, match="empty"):
        _api.exec_body([])


@pytest.mark.parametrize(
    ("mode", "want"), [(0o644, "0644"), ("755", "0755"), ("0o600", "0600"), (None, None)]
)
def test_file_mode(mode: int | str | None, want: str | None) -> None:
    assert _api.file_mode(mode) == want


@pytest.mark.parametrize("mode", ["rwx", "999", "", 0o17777])
def test_file_mode_rejects(mode: int | str) -> None:
    with pytest.raises(ValueError):
        _api.file_mode(mode)


def test_read_file_params() -> None:
    call = _api.read_file("sb", "/etc/hosts", offset=2, max_bytes=10)
    assert call.params == {"path": "/etc/hosts", "offset": "2", "max_bytes": "10"}
    with pytest.raises(ValueError):
        _api.read_file("sb", "/x", limit=-1)


def test_paths_are_quoted() -> None:
    assert _api.sandbox_path("a b/c", "exec") == "/sandboxes/a%20b%2Fc/exec"
    with pytest.raises(ValueError):
        _api.sandbox_path("")


def test_shell_url() -> None:
    assert _api.shell_url("http://h:1", "sb") == "ws://h:1/sandboxes/sb/ws"
    assert (
        _api.shell_url("https://h", "sb", session_id="s1", rows=24, cols=80, cmd="top -d 1")
        == "wss://h/sandboxes/sb/ws?session_id=s1&rows=24&cols=80&cmd=top%20-d%201"
    )


def test_proxy_url() -> None:
    assert _api.proxy_url("http://h:1", "sb-1", 3000) == "http://h:1/sandboxes/sb-1/proxy/3000/"
    assert _api.proxy_url("https://h/", "a b", 80) == "https://h/sandboxes/a%20b/proxy/80/"
    for bad in (0, 65536, True, "80"):
        with pytest.raises(ValueError, match="invalid port"):
            _api.proxy_url("http://h", "sb", bad)  # type: ignore[arg-type]


def test_port_and_published_parsers() -> None:
    entry = {
        "port": 3000,
        "proxy_url": "/sandboxes/sb-1/proxy/3000/",
        "published_url": "http://web-3000.localhost:8080/",
        "sandbox_id": "sb-1",
        "sandbox_name": "web",
    }
    port = parse(Port, entry)
    assert (port.published_url, port.sandbox_name) == ("http://web-3000.localhost:8080/", "web")
    assert parse(Port, {**entry, "published_url": None}).published_url is None
    with pytest.raises(InvalidResponse, match="published_url"):
        parse(Port, {**entry, "published_url": 1})
    rule = {"id": "pub-1", "sandbox_id": "sb-1", "port": 3000, "alias": "web-3000"}
    assert parse(PublishedPort, {**rule, "url": "http://x/"}).url == "http://x/"
    with pytest.raises(InvalidResponse, match="'url' is missing"):
        parse(PublishedPort, rule)


def test_upload_body_sizes() -> None:
    assert _api.upload_body("é") == (2, "é".encode())
    size, content = _api.upload_body(io.BytesIO(b"0123456789"))
    assert size == 10
    assert b"".join(content) == b"0123456789"
    stream = io.BytesIO(b"0123456789")
    stream.seek(4)
    size, content = _api.upload_body(stream)
    assert (size, b"".join(content)) == (6, b"456789")


def test_upload_stops_at_announced_size() -> None:
    stream = io.BytesIO(b"abc")
    chunks = _api.iter_upload(stream, 5)
    with pytest.raises(ValueError, match="ended 2 bytes before"):
        list(chunks)


def test_volume_and_template_parsers() -> None:
    vol = parse(Volume, {"name": "v", "size_mb": 64, "attached_to": "sb-1", "mount": "/v"})
    assert (vol.attached_to, vol.mount) == ("sb-1", "/v")
    tpl = parse(
        Template,
        {"id": "t-1", "name": "py", "env": {"A": "1"}, "volumes": [{"name": "v", "mount": "/v"}]},
    )
    assert tpl.volumes == (VolumeMount("v", "/v"),)
    with pytest.raises(InvalidResponse, match="env"):
        parse(Template, {"id": "t", "env": {"A": 1}})


def test_shell_helpers() -> None:
    assert exit_code_from_close(1000, "exit 3") == 3
    assert exit_code_from_close(1000, "") is None
    assert exit_code_from_close(1011, "exit 3") is None
    assert resize_message(24, 80) == '{"type": "resize", "rows": 24, "cols": 80}'
    with pytest.raises(ValueError):
        resize_message(0, 80)
