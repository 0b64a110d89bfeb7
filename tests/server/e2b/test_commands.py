"""``sandbox.commands`` and ``sandbox.pty`` of the unmodified ``e2b`` SDK (sync), on a
real daemon with a real QEMU microVM: envd's process.Process on kiln's agent.

One sandbox serves the module: every test starts its own processes and ends
them. Results are checked as the SDK returns them, and cross-checked through
kiln's own API (the process table) where the SDK alone could not tell.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    SandboxException,
    TimeoutException,
)

from .conftest import E2B_MARKS, E2bDaemon, make_sandbox

pytestmark = [*E2B_MARKS, pytest.mark.usefixtures("e2b_env")]


@pytest.fixture(scope="module")
def sb(e2b_daemon: E2bDaemon) -> Iterator[Any]:
    sandbox = make_sandbox(e2b_daemon, envs={"FROM_CREATE": "created"}, timeout=900)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def kiln_process(api: httpx.Client, sandbox_id: str, pid: int) -> dict[str, Any]:
    r = api.get(f"/sandboxes/{sandbox_id}/processes/{pid}")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def wait_until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_run_stdout_stderr_exit_code(sb: Any) -> None:
    result = sb.commands.run("echo out; echo err >&2; printf 'no newline'")
    assert result.exit_code == 0
    assert result.stdout == "out\nno newline"
    assert result.stderr == "err\n"
    assert result.error is None


def test_nonzero_exit_raises_with_the_result(sb: Any) -> None:
    with pytest.raises(CommandExitException) as info:
        sb.commands.run("echo partial; echo bad >&2; exit 3")
    exc = info.value
    assert exc.exit_code == 3
    assert exc.stdout == "partial\n"
    assert exc.stderr == "bad\n"
    assert exc.error == "exit status 3"
    assert "exited with code 3" in str(exc)


def test_default_user_home_and_env(sb: Any) -> None:
    result = sb.commands.run('id -un; echo "$HOME"; pwd; echo "$FROM_CREATE"')
    assert result.stdout.split("\n")[:4] == ["user", "/home/user", "/home/user", "created"]
    # As in envd, a command starts in its user's home.
    assert sb.commands.run("pwd", user="root").stdout == "/root\n"


def test_unknown_user(sb: Any) -> None:
    with pytest.raises(InvalidArgumentException, match="mallory"):
        sb.commands.run("true", user="mallory")


def test_cwd_and_envs(sb: Any) -> None:
    result = sb.commands.run('pwd; echo "$A-$B"', cwd="/tmp", envs={"A": "1", "B": "two words"})
    assert result.stdout == "/tmp\n1-two words\n"


def test_user_root(sb: Any) -> None:
    assert sb.commands.run("id -u", user="root").stdout == "0\n"
    assert sb.commands.run("id -u", user="user").stdout != "0\n"


def test_callbacks_see_output_as_it_comes(sb: Any) -> None:
    out: list[str] = []
    err: list[str] = []
    result = sb.commands.run(
        "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.2; done",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == result.stdout == "o1\no2\no3\n"
    assert "".join(err) == result.stderr == "e1\ne2\ne3\n"
    assert len(out) >= 2  # in pieces, as printed


def test_large_output(sb: Any) -> None:
    result = sb.commands.run("head -c 300000 /dev/zero | tr '\\0' x; echo")
    assert result.stdout == "x" * 300000 + "\n"


def test_stdin_is_closed_unless_asked_for(sb: Any) -> None:
    # stdin=False (the default): a command reading stdin sees end-of-file at once.
    assert sb.commands.run("cat; echo done").stdout == "done\n"


def test_timeout_kills_the_command(sb: Any, kiln_api: httpx.Client) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sb.commands.run("echo started; sleep 60", timeout=2)
    assert time.monotonic() - started < 30
    procs = kiln_api.get(f"/sandboxes/{sb.sandbox_id}/processes").json()
    sleepers = [p for p in procs if "sleep 60" in " ".join(p["cmd"])]
    assert sleepers
    wait_until(lambda: not kiln_process(kiln_api, sb.sandbox_id, sleepers[-1]["pid"])["running"])


def test_background_list_stdin_wait(sb: Any, kiln_api: httpx.Client) -> None:
    handle = sb.commands.run("cat; echo bye >&2", background=True, stdin=True)
    listed = {p.pid: p for p in sb.commands.list()}
    assert handle.pid in listed
    assert listed[handle.pid].cmd == "/bin/bash"
    assert listed[handle.pid].args == ["-l", "-c", "cat; echo bye >&2"]
    # The same process, by the same pid, in kiln's own process table.
    assert kiln_process(kiln_api, sb.sandbox_id, handle.pid)["running"] is True
    sb.commands.send_stdin(handle.pid, "hello\n")
    sb.commands.send_stdin(handle.pid, b"bytes too\n")
    sb.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "hello\nbytes too\n"
    assert result.stderr == "bye\n"
    assert handle.pid not in {p.pid for p in sb.commands.list()}


def test_connect_to_a_running_command(sb: Any) -> None:
    handle = sb.commands.run(
        "read line; echo got $line; sleep 0.5; echo end", background=True, stdin=True
    )
    seen: list[str] = []
    other = sb.commands.connect(handle.pid)
    assert other.pid == handle.pid
    sb.commands.send_stdin(handle.pid, "ping\n")
    result = other.wait(on_stdout=seen.append)
    assert result.exit_code == 0
    assert result.stdout == "got ping\nend\n"
    assert "".join(seen) == result.stdout
    assert handle.wait().stdout == "got ping\nend\n"  # the first reader got it all too


def test_kill(sb: Any) -> None:
    handle = sb.commands.run("sleep 300", background=True)
    assert sb.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == 137  # SIGKILL, as kiln reports it (envd: -1)
    assert sb.commands.kill(handle.pid) is False  # gone now
    assert handle.pid not in {p.pid for p in sb.commands.list()}


def test_handle_kill_and_disconnect(sb: Any) -> None:
    handle = sb.commands.run("sleep 300", background=True)
    handle.disconnect()  # stops reading; the command runs on
    assert handle.pid in {p.pid for p in sb.commands.list()}
    assert handle.kill() is True
    wait_until(lambda: handle.pid not in {p.pid for p in sb.commands.list()})


def test_input_for_a_command_without_stdin(sb: Any) -> None:
    handle = sb.commands.run("sleep 300", background=True)  # stdin=False, the default
    with pytest.raises(SandboxException, match="stdin is closed"):
        sb.commands.send_stdin(handle.pid, "x")
    assert handle.kill() is True


def test_unknown_pid(sb: Any) -> None:
    assert sb.commands.kill(999_999) is False
    with pytest.raises(NotFoundException):
        sb.commands.send_stdin(999_999, "x")
    with pytest.raises(NotFoundException):
        sb.commands.connect(999_999)


def read_until(handle: Any, marker: bytes) -> bytes:
    """PTY output from a sync handle until ``marker`` has come."""
    out = bytearray()
    for _, _, pty in handle:
        if pty is not None:
            out += pty
        if marker in out:
            return bytes(out)
    raise AssertionError(f"the terminal ended before {marker!r}: {bytes(out)!r}")


def test_pty_size_resize_and_exit(sb: Any) -> None:
    handle = sb.pty.create(PtySize(rows=24, cols=80), envs={"MARK": "mark"})
    assert handle.pid in {p.pid for p in sb.commands.list()}
    sb.pty.send_stdin(handle.pid, b"stty size; echo $MARK-$((6*7))\n")
    assert b"24 80" in read_until(handle, b"mark-42")
    sb.pty.resize(handle.pid, PtySize(rows=50, cols=132))
    sb.pty.send_stdin(handle.pid, b"stty size; exit 0\n")
    rest = bytearray()
    result = handle.wait(on_pty=rest.extend)
    assert result.exit_code == 0
    assert b"50 132" in rest


def test_pty_kill(sb: Any) -> None:
    handle = sb.pty.create(PtySize(rows=24, cols=80))
    assert sb.pty.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        handle.wait()
    assert sb.pty.kill(handle.pid) is False
