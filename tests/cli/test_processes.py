"""``kiln exec -d``, ``ps``, ``logs`` and ``kill``: background processes from the CLI."""

from __future__ import annotations

import json
import time
from typing import Any

from kiln.sdk import Kiln, Sandbox

from .conftest import Cli, unique
from .test_commands import assert_one_line_error


def _ps(cli: Cli, sandbox: str) -> dict[int, dict[str, Any]]:
    return {p["pid"]: p for p in json.loads(cli.ok("ps", sandbox, "--json"))}


def _finished(cli: Cli, sandbox: str, pid: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        proc = _ps(cli, sandbox)[pid]
        if not proc["running"]:
            return proc
        assert time.monotonic() < deadline, proc
        time.sleep(0.05)


def test_exec_detached_prints_the_pid_and_logs_read_it(cli: Cli, sb: Sandbox) -> None:
    script = "printf 'out\\377'; printf err >&2; sleep 0.3; echo late; exit 3"
    out = cli.ok("exec", "-d", sb.name, "--", "sh", "-c", script)
    pid = int(out)
    assert out == f"{pid}\n"
    follow = cli("logs", sb.name, str(pid), "-f")
    assert follow.returncode == 3  # -f exits with the process's code
    assert (follow.stdout, follow.stderr) == (b"out\xfflate\n", b"err")
    kept = cli("logs", sb.name, str(pid))
    assert (kept.returncode, kept.stdout, kept.stderr) == (0, b"out\xfflate\n", b"err")


def test_exec_detached_json_and_piped_stdin(cli: Cli, sb: Sandbox) -> None:
    proc = cli("exec", "-d", "--json", sb.name, "--", "cat", input=b"piped\n")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["cmd"] == ["cat"] and info["running"] is True and info["exit_code"] is None
    # The piped input was sent, then stdin closed: cat echoes it and exits.
    assert _finished(cli, sb.name, info["pid"])["exit_code"] == 0
    assert cli.ok("logs", sb.name, str(info["pid"])) == "piped\n"


def test_ps_lists_processes_and_sessions(cli: Cli, kiln: Kiln) -> None:
    name = unique("ps")
    cli.ok("create", "--name", name, "--init", "sleep 600")
    try:
        pid = int(cli.ok("exec", "-d", name, "--", "sleep", "30"))
        table = cli.ok("ps", name)
        header = table.splitlines()[0].split()
        assert header == ["PID", "SESSION", "STATUS", "STARTED", "COMMAND"]
        row = next(line for line in table.splitlines() if line.split()[:1] == [str(pid)])
        assert "running" in row and "sleep 30" in row
        assert any("init" in line for line in table.splitlines()[1:])
        listed = _ps(cli, name)
        assert listed[pid]["session_id"] is None and listed[pid]["tty"] is False
        assert any(p["session_id"] == "init" and p["tty"] for p in listed.values())
    finally:
        kiln.sandboxes.delete(name)


def test_kill_signals_a_pid(cli: Cli, sb: Sandbox) -> None:
    pid = cli.ok("exec", "-d", sb.name, "--", "sleep", "30").strip()
    assert cli.ok("kill", sb.name, pid) == f"sent TERM to {pid}\n"
    finished = _finished(cli, sb.name, int(pid))
    assert finished["exit_code"] == 143
    assert "exited 143" in cli.ok("ps", sb.name)

    pid = cli.ok("exec", "-d", sb.name, "--", "sleep", "30").strip()
    cli.ok("kill", sb.name, pid, "-s", "KILL")
    assert _finished(cli, sb.name, int(pid))["exit_code"] == 137
    # Signalling it again is refused: it has finished.
    assert_one_line_error(cli("kill", sb.name, pid), "exited")


def test_kill_a_session_by_id_with_a_signal(cli: Cli, kiln: Kiln) -> None:
    name = unique("sess")
    cli.ok("create", "--name", name, "--init", "sleep 600")
    try:
        assert "sent INT to session init" in cli.ok("kill", name, "init", "-s", "INT")
        assert_one_line_error(cli("kill", name, "nosuch", "-s", "TERM"), "nosuch")
    finally:
        kiln.sandboxes.delete(name)


def test_bad_input_is_one_line(cli: Cli, sb: Sandbox) -> None:
    assert_one_line_error(cli("logs", sb.name, "4000000"), "4000000")
    assert_one_line_error(cli("kill", sb.name, "4000000"), "4000000")
    assert_one_line_error(cli("logs", sb.name, "abc"), "PID")
    pid = cli.ok("exec", "-d", sb.name, "--", "sleep", "30").strip()
    assert_one_line_error(cli("kill", sb.name, pid, "-s", "STOP"), "STOP")
    assert_one_line_error(cli("exec", "-d", sb.name, "--", "no-such-cmd-xyz"), "not found")
    assert_one_line_error(cli("exec", "-d", "--timeout", "1", sb.name, "--", "true"), "-d")
    assert_one_line_error(cli("exec", "--json", sb.name, "--", "true"), "-d")
    cli.ok("kill", sb.name, pid, "-s", "KILL")
