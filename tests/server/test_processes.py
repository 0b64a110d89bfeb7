"""``/sandboxes/{id}/processes``: background commands over real HTTP and real agents."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from .conftest import ApiUser
from .harness import LiveServer

LOOP = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"


def start(api: ApiUser, sandbox: str, *cmd: str, **extra: object) -> dict[str, Any]:
    r = api.http.post(f"/sandboxes/{sandbox}/processes", json={"cmd": list(cmd), **extra})
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


def get(api: ApiUser, sandbox: str, pid: int) -> dict[str, Any]:
    r = api.http.get(f"/sandboxes/{sandbox}/processes/{pid}")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def wait_finished(api: ApiUser, sandbox: str, pid: int, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = get(api, sandbox, pid)
        if not info["running"]:
            return info
        assert time.monotonic() < deadline, f"process {pid} still running: {info}"
        time.sleep(0.02)


def lines(r: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in r.iter_lines():
        if line:
            yield json.loads(line)


def output(api: ApiUser, sandbox: str, pid: int, **params: str) -> list[dict[str, Any]]:
    """The whole NDJSON output stream (to its exit line, or its end)."""
    url = f"/sandboxes/{sandbox}/processes/{pid}/output"
    with api.http.stream("GET", url, params=params) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return list(lines(r))


def joined(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(e["data"] for e in events if e["type"] == kind)


def test_start_get_and_list(api: ApiUser) -> None:
    api.sandbox(name="bg")
    proc = start(api, "bg", "sh", "-c", "echo started; sleep 30", env={"X": "1"})
    assert set(proc) >= {"pid", "cmd", "running", "exit_code", "started_at", "finished_at"}
    assert proc["cmd"] == ["sh", "-c", "echo started; sleep 30"]
    assert proc["running"] is True and proc["exit_code"] is None and proc["finished_at"] is None
    assert proc["tty"] is False and proc["session_id"] is None
    started = datetime.fromisoformat(proc["started_at"])
    assert started.tzinfo is not None and abs(started.timestamp() - time.time()) < 30

    assert get(api, "bg", proc["pid"]) == proc
    listed = api.http.get("/sandboxes/bg/processes").json()
    assert proc in listed


def test_env_cwd_and_user(api: ApiUser, server: LiveServer) -> None:
    sb = api.sandbox(name="bgenv", env={"FROM_SANDBOX": "s"})
    workdir = server.engine.workdir(str(sb["id"]))
    script = 'echo "$FROM_SANDBOX $FROM_REQUEST $(pwd)"'
    proc = start(api, "bgenv", "sh", "-c", script, env={"FROM_REQUEST": "r"}, cwd=str(workdir))
    events = output(api, "bgenv", proc["pid"])
    assert joined(events, "stdout") == f"s r {workdir}\n"
    # The sandbox user by name is the default user.
    proc = start(api, "bgenv", "true", user="sandbox")
    assert output(api, "bgenv", proc["pid"])[-1] == {"type": "exit", "exit_code": 0}


def test_output_replays_then_ends_with_exit(api: ApiUser) -> None:
    api.sandbox(name="replay")
    proc = start(api, "replay", "sh", "-c", "echo out; echo err >&2; exit 3")
    finished = wait_finished(api, "replay", proc["pid"])
    assert finished["exit_code"] == 3
    assert datetime.fromisoformat(finished["finished_at"]) >= datetime.fromisoformat(
        finished["started_at"]
    )
    events = output(api, "replay", proc["pid"])
    assert joined(events, "stdout") == "out\n" and joined(events, "stderr") == "err\n"
    assert events[-1] == {"type": "exit", "exit_code": 3}
    assert output(api, "replay", proc["pid"]) == events  # as often as asked


def test_two_readers_at_once_see_the_same_output(api: ApiUser) -> None:
    api.sandbox(name="readers")
    script = "echo one; echo two >&2; sleep 0.4; echo three; exit 7"
    proc = start(api, "readers", "sh", "-c", script)
    results: list[list[dict[str, Any]]] = [[], []]

    def read(i: int) -> None:
        results[i] = output(api, "readers", proc["pid"])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for events in results:
        assert joined(events, "stdout") == "one\nthree\n"
        assert joined(events, "stderr") == "two\n"
        assert events[-1] == {"type": "exit", "exit_code": 7}


def test_a_reader_leaving_does_not_stop_the_process(api: ApiUser) -> None:
    api.sandbox(name="leave")
    proc = start(api, "leave", "sh", "-c", LOOP)
    url = f"/sandboxes/leave/processes/{proc['pid']}/output"
    with api.http.stream("GET", url) as r:
        first = next(lines(r))
    assert first == {"type": "stdout", "data": "tick 0\n"}
    time.sleep(0.3)
    assert get(api, "leave", proc["pid"])["running"] is True
    # A later reader gets the kept output from the start, then live output.
    with api.http.stream("GET", url) as r:
        seen = ""
        for event in lines(r):
            seen += event["data"]
            if "tick 12\n" in seen:
                break
    assert seen.startswith("tick 0\ntick 1\n")
    r = api.http.post(f"/sandboxes/leave/processes/{proc['pid']}/signal", json={"signal": "KILL"})
    assert r.status_code == 204, r.text
    assert wait_finished(api, "leave", proc["pid"])["exit_code"] == 137


def test_follow_false_gives_the_kept_output_only(api: ApiUser) -> None:
    api.sandbox(name="nofollow")
    proc = start(api, "nofollow", "sh", "-c", "echo early; sleep 30")
    time.sleep(0.3)
    began = time.monotonic()
    events = output(api, "nofollow", proc["pid"], follow="false")
    assert time.monotonic() - began < 5
    assert events == [{"type": "stdout", "data": "early\n"}]  # no exit line: still running
    api.http.post(f"/sandboxes/nofollow/processes/{proc['pid']}/signal", json={"signal": "KILL"})
    wait_finished(api, "nofollow", proc["pid"])
    events = output(api, "nofollow", proc["pid"], follow="false")
    assert events[-1] == {"type": "exit", "exit_code": 137}


def test_output_base64(api: ApiUser) -> None:
    api.sandbox(name="b64out")
    proc = start(api, "b64out", "printf", r"\377\000ok")
    events = output(api, "b64out", proc["pid"], encoding="base64")
    data = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stdout")
    assert data == b"\xff\x00ok"
    assert all(e.get("encoding") == "base64" for e in events if e["type"] == "stdout")
    assert events[-1] == {"type": "exit", "exit_code": 0}


def test_stdin_reaches_the_process_and_close_ends_it(api: ApiUser) -> None:
    api.sandbox(name="cat")
    proc = start(api, "cat", "cat")
    pid = proc["pid"]
    url = f"/sandboxes/cat/processes/{pid}"
    with api.http.stream("GET", f"{url}/output") as r:
        events = lines(r)
        assert api.http.post(f"{url}/stdin", content=b"hello\n").status_code == 204
        assert next(events) == {"type": "stdout", "data": "hello\n"}  # echoed live
        r2 = api.http.post(f"{url}/stdin", params={"close": "true"}, content=b"bye\n")
        assert r2.status_code == 204, r2.text
        rest = list(events)
    assert joined(rest, "stdout") == "bye\n"
    assert rest[-1] == {"type": "exit", "exit_code": 0}
    r = api.http.post(f"{url}/stdin", content=b"late")
    assert r.status_code == 409 and r.json()["error"]


@pytest.mark.parametrize(("name", "code"), [("TERM", 143), ("KILL", 137), ("sigint", 130)])
def test_signals(api: ApiUser, name: str, code: int) -> None:
    api.sandbox(name=f"sig-{name.lower()}")
    proc = start(api, f"sig-{name.lower()}", "sleep", "30")
    url = f"/sandboxes/sig-{name.lower()}/processes/{proc['pid']}"
    assert api.http.post(f"{url}/signal", json={"signal": name}).status_code == 204
    assert wait_finished(api, f"sig-{name.lower()}", proc["pid"])["exit_code"] == code
    r = api.http.post(f"{url}/signal", json={"signal": "TERM"})
    assert r.status_code == 409 and r.json()["error"]


def test_bad_input(api: ApiUser) -> None:
    api.sandbox(name="badproc")
    base = "/sandboxes/badproc/processes"
    proc = start(api, "badproc", "sleep", "30")
    pid = proc["pid"]

    def error(r: httpx.Response, status: int, *words: str) -> None:
        assert r.status_code == status, (r.status_code, r.text)
        message = r.json()["error"]
        for word in words:
            assert word in message, (word, message)

    unknown = 4_000_000  # above any pid_max
    error(api.http.get(f"{base}/{unknown}"), 404)
    error(api.http.get(f"{base}/{unknown}/output"), 404)
    error(api.http.post(f"{base}/{unknown}/stdin", content=b"x"), 404)
    error(api.http.post(f"{base}/{unknown}/signal", json={"signal": "TERM"}), 404)
    error(api.http.get(f"{base}/0"), 404)
    error(api.http.get(f"{base}/abc"), 400, "pid")
    error(api.http.post(f"{base}/abc/signal", json={"signal": "TERM"}), 400, "pid")
    error(api.http.post(f"{base}/{pid}/signal", json={"signal": "STOP"}), 422, "STOP")
    error(api.http.post(f"{base}/{pid}/signal", json={"signal": 9}), 422, "signal")
    error(api.http.post(f"{base}/{pid}/signal", json={}), 422, "signal")
    error(api.http.post(f"{base}/{pid}/signal", json={"signal": "TERM", "x": 1}), 422, "x")
    error(api.http.post(base, json={"cmd": ["true"], "timeout_s": 1}), 422, "timeout_s")
    error(api.http.post(base, json={"cmd": []}), 422, "cmd")
    error(api.http.post(base, json={"cmd": "true"}), 422, "cmd")
    error(api.http.post(base, json={"cmd": ["true"], "user": "mallory"}), 422, "user")
    error(api.http.post(base, content=b"{nope"), 400, "JSON")
    error(api.http.post(base, json={"cmd": ["nope-no-such-command"]}), 400, "nope")
    error(api.http.post(base, json={"cmd": ["true"], "cwd": "/no/such/dir"}), 400)
    error(api.http.get(f"{base}/{pid}/output", params={"encoding": "rot13"}), 400, "encoding")
    error(api.http.post(f"{base}/{pid}/stdin", params={"close": "maybe"}), 400, "close")
    error(api.http.get("/sandboxes/no-such-sandbox/processes"), 404)
    # Nothing above disturbed the process.
    assert get(api, "badproc", pid)["running"] is True


def test_other_users_cannot_see_processes(api: ApiUser, make_user: Any) -> None:
    api.sandbox(name="mine")
    proc = start(api, "mine", "sleep", "30")
    other = make_user()
    r = other.http.get(f"/sandboxes/mine/processes/{proc['pid']}")
    assert r.status_code == 404
    r = other.http.post(f"/sandboxes/mine/processes/{proc['pid']}/signal", json={"signal": "KILL"})
    assert r.status_code == 404
    assert get(api, "mine", proc["pid"])["running"] is True


def test_tty_sessions_are_listed_too(api: ApiUser) -> None:
    api.sandbox(name="withinit", init="sleep 600")
    deadline = time.monotonic() + 10
    while True:
        listed = api.http.get("/sandboxes/withinit/processes").json()
        init = [p for p in listed if p["session_id"] == "init"]
        if init or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert init and init[0]["tty"] is True and init[0]["running"] is True


def test_a_reader_counts_as_activity(api: ApiUser, server: LiveServer) -> None:
    sb_id = str(api.sandbox(name="active")["id"])
    proc = start(api, "active", "sleep", "30")
    count = server.thermal.count
    before = count.get(sb_id, 0)
    with api.http.stream("GET", f"/sandboxes/active/processes/{proc['pid']}/output") as r:
        assert r.status_code == 200
        attached = count.get(sb_id, 0)
        assert attached > before  # woken and marked active when the reader attached
    deadline = time.monotonic() + 5
    while count.get(sb_id, 0) == attached:  # and once more when it left
        assert time.monotonic() < deadline, "no activity recorded when the reader left"
        time.sleep(0.02)
    assert get(api, "active", proc["pid"])["running"] is True


def test_tag_stdin_false_and_cwd_are_kept(api: ApiUser) -> None:
    sb = api.sandbox()["id"]
    info = start(api, sb, "sh", "-c", "cat; echo eof", stdin=False, tag="job-1", cwd="/tmp")
    assert (info["tag"], info["cwd"]) == ("job-1", "/tmp")
    events = output(api, sb, info["pid"])
    assert joined(events, "stdout") == "eof\n"  # cat saw end-of-file at once
    assert events[-1] == {"type": "exit", "exit_code": 0}
    assert get(api, sb, info["pid"])["tag"] == "job-1"


def test_tty_process_and_resize(api: ApiUser) -> None:
    sb = api.sandbox()["id"]
    script = "stty size; read x; stty size"
    info = start(api, sb, "sh", "-c", script, tty=True, rows=20, cols=70)
    pid = info["pid"]
    assert info["tty"] is True and info["session_id"]
    deadline = time.monotonic() + 10
    while "20 70" not in joined(output(api, sb, pid, follow="false"), "stdout"):
        assert time.monotonic() < deadline, "the first stty size did not come"
        time.sleep(0.05)
    r = api.http.post(f"/sandboxes/{sb}/processes/{pid}/resize", json={"rows": 30, "cols": 90})
    assert r.status_code == 204, r.text
    api.http.post(f"/sandboxes/{sb}/processes/{pid}/stdin", content=b"\n")
    events = output(api, sb, pid)
    text = joined(events, "stdout")
    assert "20 70" in text and "30 90" in text
    assert not joined(events, "stderr")
    assert events[-1] == {"type": "exit", "exit_code": 0}


def test_resize_refusals(api: ApiUser) -> None:
    sb = api.sandbox()["id"]
    piped = start(api, sb, "sleep", "30")["pid"]
    url = f"/sandboxes/{sb}/processes/{piped}/resize"
    r = api.http.post(url, json={"rows": 30, "cols": 90})
    assert r.status_code == 409
    assert "no terminal" in r.json()["error"]
    for body in ({"rows": 0, "cols": 90}, {"rows": 30}, {"rows": 30, "cols": 90, "x": 1}):
        assert api.http.post(url, json=body).status_code == 422, body
    r = api.http.post(f"/sandboxes/{sb}/processes/999999/resize", json={"rows": 1, "cols": 1})
    assert r.status_code == 404
    r = api.http.post(f"/sandboxes/{sb}/processes", json={"cmd": ["sh"], "rows": 5})
    assert r.status_code == 422
    assert "tty" in r.json()["error"]
