"""``POST /sandboxes/{id}/exec``: buffered, streamed (NDJSON), timeouts, disconnects."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import httpx

from .conftest import ApiUser
from .harness import LiveServer, kill_agent

NDJSON = {"Accept": "application/x-ndjson"}


def test_buffered_exec(api: ApiUser) -> None:
    api.sandbox(name="ex")
    out = api.exec("ex", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert out == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n"}


def test_env_cwd_and_sandbox_env(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="envy", env={"FROM_SANDBOX": "s"})
    workdir = server.engine.workdir(str(sb["id"]))
    (workdir / "sub").mkdir()
    out = api.exec(
        "envy",
        "sh",
        "-c",
        'echo "$FROM_SANDBOX $FROM_REQUEST"; pwd',
        env={"FROM_REQUEST": "r"},
        cwd=str(workdir / "sub"),
    )
    assert out["stdout"] == f"s r\n{workdir / 'sub'}\n"


def test_output_is_utf8_with_replacement_or_base64(api: ApiUser) -> None:
    api.sandbox(name="bytes")
    script = r"printf 'caf\303\251 \377\n'"
    text = api.exec("bytes", "sh", "-c", script)
    assert text["stdout"] == "café \ufffd\n"
    raw = api.exec("bytes", "sh", "-c", script, encoding="base64")
    assert base64.b64decode(str(raw["stdout"])) == b"caf\xc3\xa9 \xff\n"
    assert raw["stderr"] == ""


def test_command_not_found_is_an_exit_code(api: ApiUser) -> None:
    api.sandbox(name="missing")
    out = api.exec("missing", "/no/such/program")
    assert out["exit_code"] == 127
    assert out["stderr"]


def test_timeout_kills_the_command(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="slow")
    marker = server.engine.workdir(str(sb["id"])) / "survived"
    start = time.monotonic()
    out = api.exec("slow", "sh", "-c", f"echo begun; sleep 1.5; touch {marker}", timeout_s=0.3)
    assert time.monotonic() - start < 1.4
    assert out["exit_code"] == 124 and out["timed_out"] is True
    assert out["stdout"] == "begun\n"  # output before the deadline is kept
    time.sleep(1.7)
    assert not marker.exists()


def test_stream_events_in_order_and_exit_last(api: ApiUser) -> None:
    api.sandbox(name="stream")
    script = "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three; exit 5"
    arrivals: list[tuple[float, dict[str, object]]] = []
    start = time.monotonic()
    with api.http.stream(
        "POST", "/sandboxes/stream/exec", json={"cmd": ["sh", "-c", script]}, headers=NDJSON
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            if line:
                arrivals.append((time.monotonic() - start, json.loads(line)))
    events = [e for _, e in arrivals]
    assert events == [
        {"type": "stdout", "data": "one\n"},
        {"type": "stderr", "data": "two\n"},
        {"type": "stdout", "data": "three\n"},
        {"type": "exit", "exit_code": 5},
    ]
    # Each event was flushed when it happened, not at the end.
    assert arrivals[0][0] < 0.25
    assert arrivals[1][0] - arrivals[0][0] > 0.2


def test_stream_base64(api: ApiUser) -> None:
    api.sandbox(name="b64")
    r = api.http.post(
        "/sandboxes/b64/exec",
        json={"cmd": ["printf", r"\377\000"], "encoding": "base64"},
        headers=NDJSON,
    )
    events = [json.loads(line) for line in r.text.splitlines()]
    data = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stdout")
    assert data == b"\xff\x00"
    assert events[-1] == {"type": "exit", "exit_code": 0}


def test_stream_timeout_ends_with_exit(api: ApiUser) -> None:
    api.sandbox(name="stream-slow")
    r = api.http.post(
        "/sandboxes/stream-slow/exec",
        json={"cmd": ["sleep", "5"], "timeout_s": 0.3},
        headers=NDJSON,
    )
    assert json.loads(r.text.splitlines()[-1]) == {
        "type": "exit",
        "exit_code": 124,
        "timed_out": True,
    }


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _read_pid(path: Path, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def test_closing_a_silent_stream_kills_the_command(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="hangup")
    work = server.engine.workdir(str(sb["id"]))
    # A silent command (nothing to write, so only the disconnect can tell) with a child.
    script = f"sleep 300 & echo $! > {work}/child; echo $$ > {work}/pid; wait"
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {api.key}"})
    with client.stream(
        "POST", "/sandboxes/hangup/exec", json={"cmd": ["sh", "-c", script]}, headers=NDJSON
    ) as r:
        assert r.status_code == 200
        pid = _read_pid(work / "pid")
        child = _read_pid(work / "child")
    client.close()  # the response (and its connection) is gone
    assert _wait_gone(pid), "the command survived its client"
    assert _wait_gone(child), "the command's process group survived its client"


def test_abandoning_a_buffered_exec_kills_the_command(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="impatient")
    work = server.engine.workdir(str(sb["id"]))
    client = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {api.key}"}, timeout=1.0
    )
    try:
        client.post(
            "/sandboxes/impatient/exec",
            json={"cmd": ["sh", "-c", f"echo $$ > {work}/pid; exec sleep 300"]},
        )
    except httpx.ReadTimeout:
        pass
    finally:
        client.close()
    assert _wait_gone(_read_pid(work / "pid"))


def test_concurrent_execs(api: ApiUser) -> None:
    import concurrent.futures  # noqa: PLC0415

    api.sandbox(name="many")

    def one(i: int) -> dict[str, object]:
        return api.exec("many", "sh", "-c", f"sleep 0.3; echo {i}")

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    assert [r["stdout"] for r in results] == [f"{i}\n" for i in range(10)]
    assert time.monotonic() - start < 3  # they ran side by side


def test_exec_input_validation(api: ApiUser) -> None:
    api.sandbox(name="strict")
    for body in (
        {},
        {"cmd": []},
        {"cmd": "echo hi"},
        {"cmd": ["echo", 1]},
        {"cmd": ["true"], "env": {"A": 1}},
        {"cmd": ["true"], "timeout_s": -1},
        {"cmd": ["true"], "timeout_s": "10"},
        {"cmd": ["true"], "encoding": "rot13"},
    ):
        r = api.http.post("/sandboxes/strict/exec", json=body)
        assert r.status_code == 422, (body, r.text)
        assert isinstance(r.json()["error"], str)


def test_unreachable_agent_is_a_502_before_any_stream(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="dead")
    kill_agent(server.engine.agents[str(sb["id"])].pid)
    for headers in (NDJSON, {}):
        r = api.http.post("/sandboxes/dead/exec", json={"cmd": ["true"]}, headers=headers)
        assert r.status_code == 502, r.text
        assert "agent" in r.json()["error"]


def test_user_root_or_the_sandbox_user(api: ApiUser) -> None:
    # A test-mode agent's "sandbox user" is whoever started it (this test
    # process), so "sandbox" must reach it as the default and not as a name to
    # look up: this host has no such account, and the exec would fail.
    api.sandbox(name="who")
    me = str(os.geteuid())
    assert api.exec("who", "id", "-u")["stdout"] == f"{me}\n"
    assert api.exec("who", "id", "-u", user="sandbox")["stdout"] == f"{me}\n"
    assert api.exec("who", "id", "-u", user=None)["stdout"] == f"{me}\n"
    if os.geteuid() == 0:
        assert api.exec("who", "id", "-u", user="root") == {
            "exit_code": 0,
            "stdout": "0\n",
            "stderr": "",
        }
        streamed = api.http.post(
            "/sandboxes/who/exec", json={"cmd": ["id", "-un"], "user": "root"}, headers=NDJSON
        )
        lines = [json.loads(line) for line in streamed.text.splitlines()]
        assert lines == [{"type": "stdout", "data": "root\n"}, {"type": "exit", "exit_code": 0}]
    else:
        # A non-root agent cannot switch users; the agent says so (never a 500).
        r = api.http.post("/sandboxes/who/exec", json={"cmd": ["id"], "user": "root"})
        assert r.status_code == 400 and "not root" in r.json()["error"], r.text


def test_user_must_be_root_or_the_sandbox_user(api: ApiUser) -> None:
    api.sandbox(name="whom")
    for user in ("nobody", 5, "", "ROOT", "sandbox ", ["root"], True):
        for headers in ({}, NDJSON):
            r = api.http.post(
                "/sandboxes/whom/exec", json={"cmd": ["true"], "user": user}, headers=headers
            )
            assert r.status_code == 422, (user, r.text)
            error = r.json()["error"]
            assert error.startswith("user: ") and "'root'" in error and "'sandbox'" in error, error
    r = api.http.post("/sandboxes/whom/exec", json={"cmd": ["true"], "user": "nobody"})
    assert r.json() == {"error": "user: must be 'root' or 'sandbox' (the default), got 'nobody'"}
