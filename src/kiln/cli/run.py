"""``kiln run``: a sandbox for one command, removed afterwards with ``--rm``.

The removal must happen however the command ends: its own exit, an error,
Ctrl+C, or SIGTERM (turned into ``SystemExit(143)`` for the duration, so
``finally`` blocks run). Signals that arrive while the sandbox is being
created or deleted are held until that request is done: an interrupted create
would leave a sandbox nobody knows the id of, an interrupted delete a sandbox
nobody removes.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO

import click

from .execio import run_exec

if TYPE_CHECKING:
    from kiln.sdk import Kiln, Sandbox

_HELD = (signal.SIGINT, signal.SIGTERM)


def interruption(signum: int) -> BaseException:
    """What a held signal becomes once it may act: Ctrl+C as usual, SIGTERM as exit 143."""
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + signum)


@contextlib.contextmanager
def held_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of acting on them while the block runs.

    Yields the list the signals land in; the caller decides what they mean.
    """
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in _HELD}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in the block, so cleanup in ``finally`` runs."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise interruption(signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_in_new_sandbox(
    kiln: Kiln,
    argv: Sequence[str],
    *,
    spec: Mapping[str, Any],
    rm: bool,
    cwd: str | None = None,
    timeout_s: float | None = None,
    stdin: BinaryIO | None = None,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Create a sandbox from ``spec`` (``sandboxes.create`` arguments), run ``argv`` in
    it with live output, and return the command's exit status. ``rm``: delete the
    sandbox afterwards, whatever happened; otherwise ``announce(name)``."""
    with sigterm_as_exit():
        with held_signals() as held:
            sb = kiln.sandboxes.create(**spec, keep=True)
        try:
            if held:
                raise interruption(held[0])
            if not rm and announce is not None:
                announce(sb.name)
            ref = kiln.sandboxes.ref(sb.id)
            return run_exec(ref, argv, cwd=cwd, timeout_s=timeout_s, stdin=stdin)
        finally:
            if rm:
                _remove(kiln, sb)


def _remove(kiln: Kiln, sb: Sandbox) -> None:
    from kiln.sdk import KilnError, NotFound  # noqa: PLC0415 - httpx is slow to import

    with held_signals():
        # A fresh client: the Ctrl+C that brought us here may have interrupted the
        # old one anywhere, even while it held its connection pool's lock.
        try:
            with kiln.copy() as fresh:
                fresh.sandboxes.delete(sb.id)
        except NotFound:
            pass
        except KilnError as exc:
            # The command's outcome is what the caller asked for; say what leaked.
            click.echo(f"kiln: warning: could not remove sandbox {sb.name}: {exc}", err=True)
