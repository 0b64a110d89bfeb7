"""The envd router on a live daemon (fake engine, real agents): sandbox by header,
token, user, health; and the error codes the SDK maps to its exceptions."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from ..conftest import ApiUser
from ..harness import LiveServer

LIST = "/e2b/envd/process.Process/List"


@pytest.fixture
def sandbox(api: ApiUser, server: LiveServer) -> dict[str, Any]:
    sb = api.sandbox(name="envd-box")
    return {**sb, "token": server.services.envd_tokens.issue(str(sb["id"]))}


def headers(sb: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sb["id"], "X-Access-Token": sb["token"], **extra}


def test_list_by_id_and_by_name(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    r = anon.post(LIST, json={}, headers=headers(sandbox))
    assert r.status_code == 200, r.text
    assert r.json() == {"processes": []}
    r = anon.post(LIST, json={}, headers=headers(sandbox, **{"E2b-Sandbox-Id": "envd-box"}))
    assert r.status_code == 200, r.text


def test_bad_token(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    for token in ("nope", ""):
        r = anon.post(LIST, json={}, headers=headers(sandbox, **{"X-Access-Token": token}))
        assert r.status_code == 401
        assert r.json()["code"] == "unauthenticated"
    r = anon.post(LIST, json={}, headers={"E2b-Sandbox-Id": sandbox["id"]})
    assert r.status_code == 401


def test_token_of_another_sandbox(
    anon: httpx.Client,
    sandbox: dict[str, Any],
    make_user: Callable[..., ApiUser],
    server: LiveServer,
) -> None:
    other = make_user().sandbox(name="envd-box")  # same name, another user
    token = server.services.envd_tokens.issue(str(other["id"]))
    r = anon.post(LIST, json={}, headers=headers(sandbox, **{"X-Access-Token": token}))
    assert r.status_code == 401
    # By name, the token picks which of the two sandboxes called so is meant.
    r = anon.post(LIST, json={}, headers={"E2b-Sandbox-Id": "envd-box", "X-Access-Token": token})
    assert r.status_code == 200


def test_unknown_sandbox_is_not_running(anon: httpx.Client) -> None:
    r = anon.post(
        LIST, json={}, headers={"E2b-Sandbox-Id": "sb-000000000000", "X-Access-Token": "x"}
    )
    assert r.status_code == 503
    assert r.json()["code"] == "unavailable"
    assert "was not found" in r.json()["message"]  # the SDK: SandboxNotRunningException
    r = anon.post(LIST, json={})
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_argument"


def test_users(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    def basic(user: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:".encode()).decode()

    for user in ("user", "root", "sandbox"):
        r = anon.post(LIST, json={}, headers=headers(sandbox, Authorization=basic(user)))
        assert r.status_code == 200, (user, r.text)
    r = anon.post(LIST, json={}, headers=headers(sandbox, Authorization=basic("mallory")))
    assert r.status_code == 400
    assert "mallory" in r.json()["message"]
    r = anon.post(LIST, json={}, headers=headers(sandbox, Authorization="Bearer x"))
    assert r.status_code == 401


def test_health(anon: httpx.Client, sandbox: dict[str, Any], api: ApiUser) -> None:
    r = anon.get("/e2b/envd/health", headers={"E2b-Sandbox-Id": sandbox["id"]})
    assert r.status_code == 204
    api.http.delete(f"/sandboxes/{sandbox['id']}")
    r = anon.get("/e2b/envd/health", headers={"E2b-Sandbox-Id": sandbox["id"]})
    assert r.status_code == 502
    assert "was not found" in r.json()["message"]


def test_kiln_routes_are_untouched(api: ApiUser) -> None:
    r = api.http.post("/sandboxes", content=b"{bad", headers={"content-type": "text/plain"})
    assert r.status_code == 400  # still read as JSON by the body limit


def test_stream_errors_come_in_the_end_message(anon: httpx.Client) -> None:
    body = json.dumps({"process": {"pid": 1}}).encode()
    r = anon.post(
        "/e2b/envd/process.Process/Connect",
        content=struct.pack(">BI", 0, len(body)) + body,
        headers={"content-type": "application/connect+json", "E2b-Sandbox-Id": "nope"},
    )
    assert r.status_code == 200
    end = json.loads(r.content[5:])
    assert r.content[0] == 2
    assert end["error"]["code"] == "unavailable"


def envelope(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">BI", 0, len(body)) + body


def envelopes(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    out = []
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        out.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return out


def start_events(
    anon: httpx.Client, sb: dict[str, Any], request: dict[str, Any], **extra: str
) -> list[tuple[int, dict[str, Any]]]:
    r = anon.post(
        "/e2b/envd/process.Process/Start",
        content=envelope(request),
        headers=headers(sb, **{"content-type": "application/connect+json", **extra}),
    )
    assert r.status_code == 200, r.text
    return envelopes(r.content)


def test_start_stream_in_proto3_json(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    request = {
        "process": {"cmd": "sh", "args": ["-c", "printf 'a\\377'; echo e >&2; exit 5"]},
        "stdin": False,
        "tag": "t1",
    }
    events = start_events(anon, sandbox, request)
    assert all(flags == 0 for flags, _ in events[:-1])
    assert events[-1] == (2, {})  # a clean end of stream
    messages = [e["event"] for _, e in events[:-1]]
    assert set(messages[0]) == {"start"}
    assert isinstance(messages[0]["start"]["pid"], int)
    data = [m["data"] for m in messages if "data" in m]
    stdout = b"".join(base64.b64decode(d["stdout"]) for d in data if "stdout" in d)
    stderr = b"".join(base64.b64decode(d["stderr"]) for d in data if "stderr" in d)
    assert (stdout, stderr) == (b"a\xff", b"e\n")
    assert messages[-1] == {
        "end": {"exitCode": 5, "exited": True, "status": "exit status 5", "error": "exit status 5"}
    }


def test_quiet_streams_get_keepalives(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    request = {"process": {"cmd": "sleep", "args": ["2.5"]}}
    events = start_events(anon, sandbox, request, **{"Keepalive-Ping-Interval": "1"})
    kinds = [next(iter(e["event"])) for _, e in events[:-1]]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 2
    assert events[-2][1]["event"]["end"] == {"exited": True, "status": "exit status 0"}


def test_start_refusals(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    for request, code in (
        ({}, "invalid_argument"),  # no process
        ({"process": {"cmd": "true", "args": "nope"}}, "invalid_argument"),
        ({"process": {"cmd": "/no/such/program"}}, "invalid_argument"),
        ({"process": {"cmd": "true"}, "pty": {"size": {"rows": -1}}}, "invalid_argument"),
    ):
        events = start_events(anon, sandbox, request)
        assert events[-1][0] == 2
        assert events[-1][1]["error"]["code"] == code, (request, events)


def test_unary_refusals(anon: httpx.Client, sandbox: dict[str, Any]) -> None:
    base = "/e2b/envd/process.Process/"
    for method, body, code in (
        ("SendSignal", {"process": {"pid": 1}, "signal": "SIGNAL_SIGSTOP"}, "invalid_argument"),
        ("SendSignal", {"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}, "not_found"),
        ("SendSignal", {"process": {}, "signal": 9}, "invalid_argument"),
        ("SendInput", {"process": {"tag": "nobody"}, "input": {"stdin": "eA=="}}, "not_found"),
        ("Update", {"process": {"pid": "x"}}, "invalid_argument"),
    ):
        r = anon.post(base + method, json=body, headers=headers(sandbox))
        assert r.status_code in (400, 404), (method, body, r.text)
        assert r.json()["code"] == code, (method, body, r.text)


def test_tags_select_processes(anon: httpx.Client, sandbox: dict[str, Any], api: ApiUser) -> None:
    base = "/e2b/envd/process.Process/"
    # Started through kiln's own API with a tag: E2B lists it and finds it by that tag.
    r = api.http.post(
        f"/sandboxes/{sandbox['id']}/processes",
        json={"cmd": ["sleep", "60"], "tag": "sleeper", "env": {"K": "v"}, "cwd": "/tmp"},
    )
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    listed = anon.post(base + "List", json={}, headers=headers(sandbox)).json()
    assert listed == {
        "processes": [
            {
                "pid": pid,
                "tag": "sleeper",
                "config": {"cmd": "sleep", "args": ["60"], "envs": {"K": "v"}, "cwd": "/tmp"},
            }
        ]
    }
    body = {"process": {"tag": "sleeper"}, "signal": "SIGNAL_SIGKILL"}
    r = anon.post(base + "SendSignal", json=body, headers=headers(sandbox))
    assert r.status_code == 200 and r.json() == {}
    r = api.http.get(f"/sandboxes/{sandbox['id']}/processes/{pid}/output")
    assert r.text.strip().splitlines()[-1] == '{"type":"exit","exit_code":137}'
