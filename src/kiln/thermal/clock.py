"""The clock the thermal manager reads and sleeps on (injected, so tests drive time)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock unix seconds (comparable with the agent's ``last_activity_unix``)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """``time.time`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
