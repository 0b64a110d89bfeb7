"""Crash points: named steps of create, stop, start, destroy and volume create at
which a test can make the daemon die, to check what a restart makes of it.

Tests set ``KILN_CRASH_AT=<step>`` (several: comma-separated) in the daemon's
environment; :func:`arm` reads it once when the daemon starts, and
:func:`crash_point` with that name then kills the process itself with SIGKILL:
no cleanup, no ``finally``, no flushed buffers, as a power cut or an OOM kill
would. ``<step>:<target>`` kills another process instead, one the step names
(``crash_point("qemu.snapshot.writing", qemu=pid)``: the sandbox's QEMU), and
the daemon carries on to see how it copes. Unset (production),
:func:`crash_point` is one membership test of an empty mapping.

A line naming the step goes to stderr (unbuffered) right before the kill, so a
test can tell "crashed at the step" from "never reached it".
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

ENV = "KILN_CRASH_AT"

SELF = "self"

#: Armed step → whom to kill there (SELF or the name of a process the step passes).
_armed: dict[str, str] = {}


def arm(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Read ``KILN_CRASH_AT`` from ``env`` (default: the process environment)."""
    global _armed
    raw = (os.environ if env is None else env).get(ENV, "")
    armed = {}
    for entry in raw.split(","):
        step, _, target = entry.strip().partition(":")
        if step:
            armed[step] = target or SELF
    _armed = armed
    return dict(armed)


def crash_point(step: str, **pids: int | None) -> None:
    """SIGKILL this process if ``step`` is armed, or the process of ``pids`` it names."""
    if step in _armed:
        target = _armed[step]
        pid = os.getpid() if target == SELF else pids.get(target)
        os.write(2, f"kiln: crash point {step} reached: SIGKILL {target} ({pid})\n".encode())
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
