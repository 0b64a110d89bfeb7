"""Taking back a half-done create: cleanup steps run last-in first-out on failure."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Undo:
    """Cleanup steps of a half-done create, run in reverse order on failure."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def push(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        self._steps.append((what, step))

    async def run(self) -> None:
        """Run every step, even after one fails (each failure is logged)."""
        for what, step in reversed(self._steps):
            try:
                await step()
            except Exception:
                log.exception("cleanup after a failed create: %s failed", what)
        self._steps.clear()
