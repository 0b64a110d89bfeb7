"""JSON messages: round trips and strict validation of what a peer sends."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.protocol import (
    INIT_SESSION_ID,
    ActivityInfo,
    ClockSet,
    ExecKillRequest,
    ExecRequest,
    FileInfo,
    FileListing,
    FileReadRequest,
    FileReadResponse,
    FileWriteRequest,
    ForwardRequest,
    InvalidMessage,
    PathRequest,
    ProcessInfo,
    ProcessResize,
    ProcessStart,
    ProcessStatus,
    ProtocolError,
    SessionInfo,
    StatusResponse,
    decode_json,
    encode_json,
    format_mode,
    parse_mode,
    session_list_from_payload,
    session_list_to_payload,
)


def raw(obj: Any) -> bytes:
    """Encode with plain json, as an independent peer would."""
    return json.dumps(obj).encode()


# -- ExecRequest ---------------------------------------------------------------------


def test_exec_request_round_trip_full() -> None:
    req = ExecRequest(
        cmd=("bash", "-c", "echo héllo ✓"),
        env={"A": "1", "ÜNI": "ç"},
        cwd="/workspace/dïr",
        tty=True,
        rows=24,
        cols=80,
        user="sandbox",
    )
    back = ExecRequest.from_payload(req.to_payload())
    assert back == req
    assert json.loads(req.to_payload()) == {
        "cmd": ["bash", "-c", "echo héllo ✓"],
        "env": {"A": "1", "ÜNI": "ç"},
        "cwd": "/workspace/dïr",
        "tty": True,
        "rows": 24,
        "cols": 80,
        "user": "sandbox",
    }


def test_exec_request_minimal_wire_form() -> None:
    assert json.loads(ExecRequest(cmd=("true",)).to_payload()) == {"cmd": ["true"]}
    req = ExecRequest.from_payload(b'{"cmd":["true"]}')
    assert req == ExecRequest(cmd=("true",))
    assert req.env == {}
    assert req.cwd is None
    assert not req.tty


def test_exec_request_utf8_on_the_wire() -> None:
    payload = ExecRequest(cmd=("echo", "日本語")).to_payload()
    assert "日本語".encode() in payload  # not \u escapes
    assert ExecRequest.from_payload(payload).cmd == ("echo", "日本語")


def test_exec_request_attach_without_cmd() -> None:
    req = ExecRequest.from_payload(raw({"tty": True, "session_id": INIT_SESSION_ID}))
    assert req.session_id == "init"
    assert req.cmd == ()
    assert ExecRequest.from_payload(req.to_payload()) == req


def test_exec_request_unknown_fields_ignored() -> None:
    req = ExecRequest.from_payload(raw({"cmd": ["ls"], "future_field": {"x": 1}}))
    assert req.cmd == ("ls",)


def test_exec_request_accepts_whole_floats() -> None:
    req = ExecRequest.from_payload(raw({"cmd": ["ls"], "tty": True, "rows": 24.0, "cols": 80}))
    assert req.rows == 24
    assert isinstance(req.rows, int)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({}, "cmd"),
        ({"cmd": None}, "cmd"),
        ({"cmd": []}, "cmd"),
        ({"cmd": "ls -l"}, "cmd"),
        ({"cmd": ["ls", 1]}, "cmd"),
        ({"cmd": [["ls"]]}, "cmd"),
        ({"cmd": ["ls"], "env": ["A=1"]}, "env"),
        ({"cmd": ["ls"], "env": {"A": 1}}, "env"),
        ({"cmd": ["ls"], "env": {"A": None}}, "env"),
        ({"cmd": ["ls"], "cwd": 5}, "cwd"),
        ({"cmd": ["ls"], "tty": "yes"}, "tty"),
        ({"cmd": ["ls"], "tty": 1}, "tty"),
        ({"cmd": ["ls"], "tty": True, "rows": True}, "rows"),
        ({"cmd": ["ls"], "tty": True, "rows": "24"}, "rows"),
        ({"cmd": ["ls"], "tty": True, "rows": -1}, "rows"),
        ({"cmd": ["ls"], "tty": True, "cols": 65536}, "cols"),
        ({"cmd": ["ls"], "tty": True, "cols": 80.5}, "cols"),
        ({"cmd": ["ls"], "session_id": "s1"}, "session_id"),
        ({"tty": True, "session_id": 1}, "session_id"),
        ({"cmd": ["ls"], "user": 1000}, "user"),
    ],
)
def test_exec_request_validation(obj: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        ExecRequest.from_payload(raw(obj))


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[1,2]", b'"cmd"', b"null", b"\xff\xfe", b'{"cmd":["a"]', b"{'cmd':1}"],
)
def test_exec_request_bad_payloads(payload: bytes) -> None:
    with pytest.raises(InvalidMessage):
        ExecRequest.from_payload(payload)


def test_invalid_message_is_a_protocol_error() -> None:
    assert issubclass(InvalidMessage, ProtocolError)


def test_exec_request_constructor_validates() -> None:
    with pytest.raises(InvalidMessage):
        ExecRequest()
    with pytest.raises(InvalidMessage):
        ExecRequest(cmd=("ls",), session_id="s1")  # attach requires tty
    with pytest.raises(InvalidMessage):
        ExecRequest(cmd=("ls",), tty=True, rows=70000)


@settings(max_examples=200, deadline=None)
@given(
    cmd=st.lists(st.text(), min_size=1, max_size=5),
    env=st.dictionaries(st.text(), st.text(), max_size=4),
    cwd=st.none() | st.text(),
    rows=st.none() | st.integers(0, 65535),
)
def test_exec_request_property(
    cmd: list[str], env: dict[str, str], cwd: str | None, rows: int | None
) -> None:
    req = ExecRequest(cmd=tuple(cmd), env=env, cwd=cwd, tty=rows is not None, rows=rows)
    assert ExecRequest.from_payload(req.to_payload()) == req


# -- JSON helpers ------------------------------------------------------------------------


def test_decode_json_is_utf8_only() -> None:
    assert decode_json('{"a":"é"}'.encode()) == {"a": "é"}
    with pytest.raises(InvalidMessage):
        decode_json('{"a":1}'.encode("utf-16"))
    with pytest.raises(InvalidMessage):
        decode_json(b'{"a":"\xff"}')


@pytest.mark.parametrize("const", ["NaN", "Infinity", "-Infinity"])
def test_decode_json_rejects_non_json_constants(const: str) -> None:
    with pytest.raises(InvalidMessage):
        decode_json(f'{{"last_activity_unix":{const}}}'.encode())


def test_encode_json_lone_surrogates_round_trip() -> None:
    # A non-UTF-8 file name as os.listdir returns it (surrogateescape).
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    payload = encode_json({"name": name})
    payload.decode("ascii")  # valid JSON text, escaped
    assert decode_json(payload) == {"name": name}
    info = FileInfo(name=name, size=1, mode="0644", is_dir=False, mtime=0.0)
    assert FileInfo.from_payload(info.to_payload()) == info


def test_encode_json_is_compact_utf8() -> None:
    assert encode_json({"a": [1, "ü"]}) == '{"a":[1,"ü"]}'.encode()


# -- modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("0644", 0o644),
        ("644", 0o644),
        ("0755", 0o755),
        ("0", 0),
        ("7777", 0o7777),
        ("04755", 0o4755),
    ],
)
def test_parse_mode(text: str, mode: int) -> None:
    assert parse_mode(text) == mode


@pytest.mark.parametrize(
    "text", ["", "0o644", " 644", "644 ", "+644", "-1", "6_44", "0x1a4", "888", "abc", "17777"]
)
def test_parse_mode_rejects(text: str) -> None:
    with pytest.raises(InvalidMessage):
        parse_mode(text)


@pytest.mark.parametrize(("mode", "text"), [(0o644, "0644"), (0o7, "0007"), (0o100644, "0644")])
def test_format_mode(mode: int, text: str) -> None:
    assert format_mode(mode) == text


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 0o7777))
def test_mode_property(mode: int) -> None:
    assert parse_mode(format_mode(mode)) == mode


# -- SessionInfo / ActivityInfo ---------------------------------------------------------------


def test_session_info_round_trip() -> None:
    info = SessionInfo("s1", "bash -l", True, True, False, 1700000000.5, None)
    assert SessionInfo.from_payload(info.to_payload()) == info
    assert json.loads(info.to_payload())["exit_code"] is None
    done = SessionInfo("init", "/init.sh", True, False, False, 1700000000, -15)
    assert SessionInfo.from_payload(done.to_payload()) == done


def test_session_list_round_trip() -> None:
    sessions = [
        SessionInfo("s1", "bash", True, True, True, 1.0, None),
        SessionInfo("s2", "vim ✓", True, False, False, 2.0, 0),
    ]
    assert session_list_from_payload(session_list_to_payload(sessions)) == sessions
    assert session_list_from_payload(b"[]") == []
    with pytest.raises(InvalidMessage):
        session_list_from_payload(b'{"session_id":"s1"}')
    with pytest.raises(InvalidMessage):
        session_list_from_payload(b"[1]")


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"session_id": 1},
        {"session_id": "s1", "running": "yes"},
        {"session_id": "s1", "exit_code": True},
        {"session_id": "s1", "exit_code": "0"},
        {"session_id": "s1", "created_at": "today"},
    ],
)
def test_session_info_validation(obj: dict[str, Any]) -> None:
    with pytest.raises(InvalidMessage):
        SessionInfo.from_payload(raw(obj))


def test_activity_info() -> None:
    info = ActivityInfo(1700000000.25, attached_sessions=1, running_sessions=3)
    assert ActivityInfo.from_payload(info.to_payload()) == info
    assert ActivityInfo.from_payload(raw({"last_activity_unix": 5})).last_activity_unix == 5.0
    for bad in (
        {},
        {"last_activity_unix": "5"},
        {"last_activity_unix": True},
        {"last_activity_unix": 1, "running_sessions": -1},
        {"last_activity_unix": 1, "attached_sessions": 1.5},
    ):
        with pytest.raises(InvalidMessage):
            ActivityInfo.from_payload(raw(bad))


# -- files ---------------------------------------------------------------------------------------


def test_file_info_round_trip_and_stat_path() -> None:
    info = FileInfo("ñame.txt", 12, "0644", False, 1700000000.0)
    assert FileInfo.from_payload(info.to_payload()) == info
    assert "path" not in json.loads(info.to_payload())
    stat = FileInfo("b", 0, "0755", True, 1.5, path="/a/b")
    assert FileInfo.from_payload(stat.to_payload()) == stat


@pytest.mark.parametrize(
    "obj",
    [
        {"size": 1, "mode": "0644"},
        {"name": "a", "mode": "0644"},
        {"name": "a", "size": -1, "mode": "0644"},
        {"name": "a", "size": True, "mode": "0644"},
        {"name": "a", "size": 1, "mode": 420},
        {"name": "a", "size": 1, "mode": "0644", "is_dir": "no"},
    ],
)
def test_file_info_validation(obj: dict[str, Any]) -> None:
    with pytest.raises(InvalidMessage):
        FileInfo.from_payload(raw(obj))


def _entries(n: int) -> tuple[FileInfo, ...]:
    return tuple(FileInfo(f"f{i:05d}", i, "0644", False, float(i)) for i in range(n))


def test_file_listing_round_trip() -> None:
    listing = FileListing(_entries(3), truncated=False, total=3)
    assert FileListing.from_payload(listing.to_payload()) == listing
    empty = FileListing((), total=0)
    assert FileListing.from_payload(empty.to_payload()) == empty
    assert FileListing.from_payload(b"[]") == empty


def test_file_listing_sentinel_round_trip() -> None:
    listing = FileListing(_entries(4), truncated=True, total=12345)
    payload = listing.to_payload()
    items = json.loads(payload)
    assert len(items) == 5
    assert items[-1] == {"name": "...", "truncated": True, "total": 12345}
    back = FileListing.from_payload(payload)
    assert back == listing
    assert len(back.entries) == 4


def test_file_listing_from_independent_peer() -> None:
    items = [
        {"name": "a", "size": 1, "mode": "0644", "is_dir": False, "mtime": 1},
        {"name": "d", "size": 4096, "mode": "0755", "is_dir": True, "mtime": 2.5},
        {"name": "...", "truncated": True, "total": 10002},
    ]
    listing = FileListing.from_payload(raw(items))
    assert [e.name for e in listing.entries] == ["a", "d"]
    assert listing.entries[1].is_dir
    assert listing.truncated
    assert listing.total == 10002


def test_file_listing_validation() -> None:
    with pytest.raises(InvalidMessage):
        FileListing.from_payload(b'{"name":"a"}')
    with pytest.raises(InvalidMessage):
        FileListing.from_payload(raw([{"name": "a"}]))
    with pytest.raises(InvalidMessage):
        FileListing.from_payload(raw([{"name": "...", "truncated": True, "total": -3}]))


def test_file_read_request() -> None:
    req = FileReadRequest("/etc/hosts", offset=10, limit=5, max_bytes=100)
    assert FileReadRequest.from_payload(req.to_payload()) == req
    assert FileReadRequest.from_payload(raw({"path": "/x"})) == FileReadRequest("/x")
    for bad in (
        {},
        {"path": ""},
        {"path": "/a\x00b"},
        {"path": 5},
        {"path": "/x", "offset": -1},
        {"path": "/x", "limit": "10"},
        {"path": "/x", "max_bytes": False},
    ):
        with pytest.raises(InvalidMessage):
            FileReadRequest.from_payload(raw(bad))


def test_file_read_response() -> None:
    resp = FileReadResponse(size=1 << 40, mode="0600")
    assert FileReadResponse.from_payload(resp.to_payload()) == resp
    with pytest.raises(InvalidMessage):
        FileReadResponse.from_payload(raw({"mode": "0644"}))
    with pytest.raises(InvalidMessage):
        FileReadResponse.from_payload(raw({"size": -1}))


def test_file_write_request() -> None:
    req = FileWriteRequest("/w/ü.bin", 0, "0600")
    assert FileWriteRequest.from_payload(req.to_payload()) == req
    assert FileWriteRequest.from_payload(raw({"path": "/x", "size": 3})).mode is None
    for bad, match in (
        ({"path": "/x"}, "size"),
        ({"path": "/x", "size": -1}, "size"),
        ({"path": "/x", "size": "3"}, "size"),
        ({"path": "/x", "size": True}, "size"),
        ({"path": "/x", "size": 3, "mode": "rwx"}, "mode"),
        ({"path": "/x", "size": 3, "mode": 420}, "mode"),
        ({"size": 3}, "path"),
    ):
        with pytest.raises(InvalidMessage, match=match):
            FileWriteRequest.from_payload(raw(bad))
    with pytest.raises(InvalidMessage):
        FileWriteRequest("/x", -5)


def test_path_request() -> None:
    assert PathRequest.from_payload(PathRequest("/tmp/✓").to_payload()) == PathRequest("/tmp/✓")
    with pytest.raises(InvalidMessage):
        PathRequest.from_payload(raw({"path": None}))


# -- the small ones ---------------------------------------------------------------------------


def test_status_response() -> None:
    ok = StatusResponse.from_payload(b'{"status":"ok"}')
    assert ok.ok
    assert ok.message is None
    err = StatusResponse.from_payload(raw({"status": "error", "message": "connection refused"}))
    assert not err.ok
    assert err.message == "connection refused"
    assert StatusResponse.from_payload(err.to_payload()) == err
    with pytest.raises(InvalidMessage):
        StatusResponse.from_payload(b"{}")
    with pytest.raises(InvalidMessage):
        StatusResponse.from_payload(raw({"status": True}))


def test_forward_request() -> None:
    assert ForwardRequest.from_payload(b'{"port": 8080}') == ForwardRequest(8080)
    assert ForwardRequest.from_payload(ForwardRequest(65535).to_payload()).port == 65535
    for bad in ({}, {"port": 0}, {"port": 65536}, {"port": "80"}, {"port": True}, {"port": -1}):
        with pytest.raises(InvalidMessage):
            ForwardRequest.from_payload(raw(bad))


def test_exec_kill_request() -> None:
    assert ExecKillRequest.from_payload(b'{"session_id":"s1"}') == ExecKillRequest("s1")
    with pytest.raises(InvalidMessage):
        ExecKillRequest.from_payload(b'{"session_id":1}')


def test_clock_set() -> None:
    ns = 1_700_000_000_123_456_789
    assert ClockSet.from_payload(ClockSet(ns).to_payload()).unix_ns == ns
    for bad in ({}, {"unix_ns": -1}, {"unix_ns": "1"}, {"unix_ns": 1.5}, {"unix_ns": True}):
        with pytest.raises(InvalidMessage):
            ClockSet.from_payload(raw(bad))


def test_clock_set_seed_round_trips_as_hex() -> None:
    msg = ClockSet(5, seed=bytes(range(64)))
    assert msg.to_json() == {"unix_ns": 5, "seed": bytes(range(64)).hex()}
    assert ClockSet.from_payload(msg.to_payload()) == msg
    assert ClockSet.from_payload(raw({"unix_ns": 5})).seed is None


@pytest.mark.parametrize("seed", ["zz", "abc", 7])
def test_clock_set_rejects_a_bad_seed(seed: object) -> None:
    with pytest.raises(InvalidMessage, match="seed"):
        ClockSet.from_payload(raw({"unix_ns": 1, "seed": seed}))


def test_clock_set_rejects_an_oversized_seed() -> None:
    with pytest.raises(InvalidMessage, match="at most"):
        ClockSet(1, seed=bytes(4097))


# -- found by tests/protocol/test_fuzz.py ---------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "doc"),
    [
        (SessionInfo, {"session_id": "s", "created_at": 10**400}),
        (ActivityInfo, {"last_activity_unix": -(10**400)}),
        (FileInfo, {"name": "a", "size": 1, "mode": "0644", "mtime": 10**400}),
        (ProcessInfo, {"pid": 1, "cmd": ["x"], "started_at": 10**400}),
        (ProcessInfo, {"pid": 1, "cmd": ["x"], "started_at": 1, "finished_at": 10**400}),
    ],
)
def test_a_time_no_float_can_hold_is_an_invalid_message(cls: Any, doc: dict[str, Any]) -> None:
    # It used to escape as OverflowError, which callers do not expect from a peer's bytes.
    with pytest.raises(InvalidMessage, match="out of range"):
        cls.from_json(doc)


def test_a_process_error_without_a_message_round_trips() -> None:
    status = ProcessStatus.from_json({"status": "error", "reason": "not_found"})
    assert status.message == "not_found"  # what to_json writes for it
    assert ProcessStatus.from_payload(status.to_payload()) == status


# -- what E2B's process service needs ---------------------------------------------------


def test_process_start_options_round_trip() -> None:
    start = ProcessStart(("sh",), stdin=False, tag="t", tty=True, rows=24, cols=80)
    assert ProcessStart.from_payload(start.to_payload()) == start
    plain = ProcessStart(("sh",))
    assert plain.to_json() == {"cmd": ["sh"]}  # defaults stay off the wire
    assert ProcessStart.from_json({"cmd": ["sh"]}).stdin is True


@pytest.mark.parametrize(
    "doc",
    [
        {"cmd": ["sh"], "rows": 24},  # a size without a terminal
        {"cmd": ["sh"], "tty": True, "rows": 0},
        {"cmd": ["sh"], "tty": True, "cols": 65536},
        {"cmd": ["sh"], "stdin": "no"},
        {"cmd": ["sh"], "tag": 5},
    ],
)
def test_process_start_refuses(doc: dict[str, Any]) -> None:
    with pytest.raises(InvalidMessage):
        ProcessStart.from_json(doc)


def test_process_resize() -> None:
    resize = ProcessResize(7, 24, 80)
    assert ProcessResize.from_payload(resize.to_payload()) == resize
    bad = [{"pid": 7, "rows": 0, "cols": 80}, {"pid": 7, "rows": 24}, {"pid": 0, "rows": 1}]
    for doc in bad:
        with pytest.raises(InvalidMessage):
            ProcessResize.from_json(doc)


def test_process_info_without_the_new_fields() -> None:
    # From an agent older than tag/cwd/env.
    info = ProcessInfo.from_json({"pid": 1, "cmd": ["x"], "running": True, "started_at": 1})
    assert (info.tag, info.cwd, dict(info.env)) == (None, None, {})
