"""Crash points: named steps of create, stop, start, destroy and volume create at
which a test can make the daemon die, to check what a restart makes of it.

Tests set ``KILN_CRASH_AT=<step>`` (several: comma-separated) in the daemon's
environment; :func:`arm` reads it once when the daemon starts, and
:func:`crash_point` with that name then kills the process itself with SIGKILL:
no cleanup, no ``finally``, no flushed buffers, as a power cut or an OOM kill
would. Unset (production), :func:`crash_point` is one membership test of an
empty set.

A line naming the step goes to stderr (unbuffered) right before the kill, so a
test can tell "crashed at the step" from "never reached it".
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

ENV = "KILN_CRASH_AT"

_armed: frozenset[str] = frozenset()


def arm(env: Mapping[str, str] | None = None) -> frozenset[str]:
    """Read ``KILN_CRASH_AT`` from ``env`` (default: the process environment)."""
    global _armed
    raw = (os.environ if env is None else env).get(ENV, "")
    _armed = frozenset(s.strip() for s in raw.split(",") if s.strip())
    return _armed


def crash_point(step: str) -> None:
    """Die here (SIGKILL) if ``step`` is armed."""
    if step in _armed:
        os.write(2, f"kiln: crash point {step} reached: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
