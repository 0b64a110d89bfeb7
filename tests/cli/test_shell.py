"""``kiln shell`` in a real pseudo-terminal: raw mode, detach with Ctrl+\\, reattach, exit code."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from kiln.cli import EXIT_CODES
from kiln.sdk import Sandbox

from .conftest import Cli, kiln_argv

PROMPT = rb"[#$] $"


class PtyRun:
    """``kiln ARGS`` with a pseudo-terminal (24x80) as its stdin, stdout and stderr."""

    def __init__(self, cli: Cli, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        env = {**os.environ, "HOME": str(cli.home), **cli.env}
        try:
            self.proc = subprocess.Popen(
                [*kiln_argv(), *args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(slave)
        self.seen = b""
        self.closed = False

    def _read_some(self, timeout: float) -> None:
        if self.closed:
            return
        if select.select([self.master], [], [], timeout)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the process exited and the terminal is gone
                chunk = b""
            self.closed = not chunk
            self.seen += chunk

    def expect(self, pattern: bytes, timeout: float = 15) -> re.Match[bytes]:
        """Read until ``pattern`` (a regex) matches the output so far."""
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.seen)) is None:
            left = deadline - time.monotonic()
            assert left > 0 and not self.closed, f"no {pattern!r} in {self.seen[-400:]!r}"
            self._read_some(min(left, 0.2))
        return match

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 15) -> int:
        code = self.proc.wait(timeout)
        while not self.closed:
            self._read_some(0.05)
            if not select.select([self.master], [], [], 0)[0]:
                break
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@contextmanager
def pty_run(cli: Cli, *args: str) -> Iterator[PtyRun]:
    run = PtyRun(cli, *args)
    try:
        yield run
    finally:
        run.close()


def test_shell_detach_key_is_configurable(cli: Cli, sb: Sandbox) -> None:
    with pty_run(cli, "shell", sb.name, "--cmd", "sh", "--detach-key", "ctrl-q") as run:
        run.expect(PROMPT)
        run.write(b"\x1cecho still-here\n")  # Ctrl+\\ is just a byte for the shell now
        run.expect(b"still-here")
        run.write(b"\x11")  # Ctrl+Q
        run.expect(rb"detached from session (\S+)")
        assert run.wait() == 0
    proc = cli("shell", sb.name, env={"KILN_DETACH_KEY": "f1"})
    assert proc.returncode == 2
    assert b"invalid detach key 'f1'" in proc.stderr


def test_shell_detach_and_reattach(cli: Cli, sb: Sandbox) -> None:
    with pty_run(cli, "shell", sb.name, "--cmd", "sh") as first:
        first.expect(PROMPT)
        first.write(b"echo $((6 * 7)); stty size\n")
        first.expect(b"24 80")
        assert b"42" in first.seen
        first.write(b"\x1c")  # Ctrl+\ detaches
        match = first.expect(
            rb"detached from session (\S+); reattach with: kiln shell \S+ --session"
        )
        assert first.wait() == 0
    session_id = match.group(1).decode()
    assert session_id in {s.session_id for s in sb.sessions.list() if s.running}

    with pty_run(cli, "sh", sb.name, "--session", session_id) as again:
        again.expect(b"42")  # the scrollback comes back
        again.write(b"exit 3\n")
        assert again.wait() == 3


def test_shell_needs_a_terminal(cli: Cli, sb: Sandbox) -> None:
    proc = cli("shell", sb.name)
    assert proc.returncode == 2
    assert b"needs a terminal" in proc.stderr


def test_shell_unknown_sandbox_is_one_line(cli: Cli) -> None:
    with pty_run(cli, "shell", "no-such-sandbox") as run:
        assert run.wait() == EXIT_CODES["not found"]
        assert run.seen.startswith(b"kiln: error: ") and b"no-such-sandbox" in run.seen
        assert b"Traceback" not in run.seen


def test_shell_as_root(cli: Cli, sb: Sandbox) -> None:
    with pty_run(cli, "shell", "-u", "nobody", sb.name) as refused:
        assert refused.wait() == 1
        assert refused.seen.startswith(b"kiln: error: ") and b"'root' or 'sandbox'" in refused.seen
    if os.geteuid() != 0:
        pytest.skip("only a root agent can run commands as root")
    with pty_run(cli, "shell", "-u", "root", sb.name, "--cmd", "sh") as run:
        run.expect(PROMPT)
        run.write(b"echo uid=$(id -u)=; exit 4\n")
        run.expect(b"uid=0=")
        assert run.wait() == 4
