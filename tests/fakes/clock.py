"""A clock that moves only when the test says so (implements ``kiln.thermal.Clock``)."""

from __future__ import annotations

import asyncio


class ManualClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._now + max(0.0, seconds), fut)
        self._sleepers.append(entry)
        self._changed.set()
        try:
            await fut
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    @property
    def sleepers(self) -> int:
        return len(self._sleepers)

    async def wait_for_sleepers(self, n: int = 1) -> None:
        """Wait (in real time, at most 5 s) until ``n`` tasks are asleep on this clock."""
        async with asyncio.timeout(5.0):
            while self.sleepers < n:
                self._changed.clear()
                await self._changed.wait()

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        self._now += seconds
        for deadline, fut in list(self._sleepers):
            if deadline <= self._now and not fut.done():
                self._sleepers.remove((deadline, fut))
                fut.set_result(None)
