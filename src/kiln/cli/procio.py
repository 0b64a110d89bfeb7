"""``kiln logs`` and ``kiln exec -d``: background processes from the command line.

A process's output is written as it arrives, stdout to stdout and stderr to
stderr, byte for byte (the same events ``kiln exec`` prints).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, BinaryIO

from .execio import exit_status

if TYPE_CHECKING:
    from kiln.sdk import SandboxRef


def run_logs(
    sandbox: SandboxRef,
    pid: int,
    *,
    follow: bool = False,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Print a process's kept output (and with ``follow`` its live output until it
    exits); the exit status for kiln: 0, or with ``follow`` the process's own."""
    from kiln.sdk import Exit, Stderr, Stdout  # noqa: PLC0415

    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    with sandbox.processes.output(pid, follow=follow) as events:
        for event in events:
            if isinstance(event, Stdout):
                out.write(event.data)
                out.flush()
            elif isinstance(event, Stderr):
                err.write(event.data)
                err.flush()
            elif isinstance(event, Exit) and follow:
                return exit_status(event.exit_code)
    return 0
