"""``kiln exec``: live NDJSON output to stdout/stderr, exit code passed through, piped stdin.

Stdin: the HTTP API's exec has no live stdin (the contract streams output
only), so piped stdin is read to its end into a local spool file, uploaded
with the files API to ``/tmp/.kiln-stdin-<random>`` (mode 0600, owned by the
sandbox user), and the command runs as::

    sh -c 'exec <"$1" && rm -f -- "$1" && shift && exec "$@"' kiln-stdin FILE CMD ARGS...

The shell opens the file as stdin, unlinks it (the open descriptor keeps the
data readable) and replaces itself with the command, so the command sees a
plain file on stdin, ``$?`` is its own exit code and nothing is left behind.
The cost: stdin must end before the command starts (no interactive input;
use ``kiln shell`` for that) and is capped by the upload limit (100 MiB).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from kiln.sdk import SandboxRef

STDIN_WRAPPER = 'exec <"$1" && rm -f -- "$1" && shift && exec "$@"'
SPOOL_IN_MEMORY = 1 << 20


def forward_stdin_wanted(flag: bool | None, fd: int = 0) -> bool:
    """Forward stdin? The flag if given; otherwise only when stdin is a pipe, file or socket.

    A terminal is never forwarded implicitly (that would wait for Ctrl+D), and
    neither is ``/dev/null`` or a closed descriptor.
    """
    if flag is not None:
        return flag
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


def stdin_command(remote_path: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` with ``remote_path`` as stdin and removes the file."""
    return ["sh", "-c", STDIN_WRAPPER, "kiln-stdin", remote_path, *argv]


def exit_status(code: int) -> int:
    """A command's exit code as a process exit status (0..255; out of range → 255)."""
    return code if 0 <= code <= 255 else 255


@contextmanager
def spooled_stdin(stream: BinaryIO) -> Iterator[IO[bytes]]:
    """All of ``stream``, spooled (memory, then a temp file), rewound for upload."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        shutil.copyfileobj(stream, spool)
        spool.seek(0)
        yield spool


def run_exec(
    sandbox: SandboxRef,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = None,
    user: str | None = None,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run ``argv`` streaming its output; return the exit status for kiln to exit with."""
    from kiln.sdk import Exit, Stderr, Stdout  # noqa: PLC0415

    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    cmd = list(argv)
    if stdin is not None:
        remote = f"/tmp/.kiln-stdin-{secrets.token_hex(8)}"
        with spooled_stdin(stdin) as data:
            sandbox.files.write(remote, data, mode=0o600)
        cmd = stdin_command(remote, cmd)
    with sandbox.exec_stream(cmd, env=env, cwd=cwd, timeout_s=timeout_s, user=user) as events:
        for event in events:
            if isinstance(event, Stdout):
                out.write(event.data)
                out.flush()
            elif isinstance(event, Stderr):
                err.write(event.data)
                err.flush()
            elif isinstance(event, Exit):
                return exit_status(event.exit_code)
    return 1  # unreachable: the stream raises if it ends without an exit event
