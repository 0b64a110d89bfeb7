"""Sandbox expiry: what is due, as a pure function of time; and the loop that acts on it.

    decide(now, sandboxes, busy) -> [Destroy(id) | Stop(id) | Disarm(id), ...]

A sandbox created or patched with ``ttl_s`` has an ``expires_at`` in the store.
Once it has passed:

- ``on_expire: destroy`` → :class:`Destroy` (as ``DELETE /sandboxes/{id}``);
- ``on_expire: stop`` and a state the user's stop changes (running) →
  :class:`Stop` (snapshot to disk, as ``POST .../stop``), and the expiry is
  cleared: a stopped sandbox stays listed;
- ``on_expire: stop`` and a state it does not change or does not allow
  (already stopped, errored or unknown; :mod:`kiln.engine.states` says which)
  → :class:`Disarm`: there is nothing to stop, only the expiry to clear.

The store is the only source of truth, so a sandbox that expired while the
daemon was down is handled by the first tick after start (right after recovery).
:class:`ExpiryReaper` acts through :class:`~kiln.server.services.SandboxService`,
which re-checks the decision under the sandbox's lock: a ``PATCH`` that extends
the ttl while a tick is running wins.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kiln.engine.base import Status, Thermal
from kiln.engine.states import Op, State, lookup
from kiln.store import OnExpire, StoreError
from kiln.thermal.clock import Clock, SystemClock

if TYPE_CHECKING:
    from .services import SandboxService

log = logging.getLogger("kiln.expiry")

#: How often the daemon looks for expired sandboxes (one indexed query when none are).
TICK_S = 1.0
#: After a failed expiry action, the sandbox is left alone this long before a retry.
RETRY_S = 30.0


class Expiring(Protocol):
    """What the decision needs from a stored sandbox (``kiln.store.Sandbox`` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> Status: ...
    @property
    def thermal(self) -> Thermal: ...
    @property
    def expires_at(self) -> float | None: ...
    @property
    def on_expire(self) -> OnExpire: ...


@dataclass(frozen=True, slots=True)
class Destroy:
    id: str


@dataclass(frozen=True, slots=True)
class Stop:
    id: str


@dataclass(frozen=True, slots=True)
class Disarm:
    """Nothing to stop: only clear the expiry."""

    id: str


ExpiryAction = Destroy | Stop | Disarm


def is_due(now: float, sb: Expiring) -> bool:
    return sb.expires_at is not None and sb.expires_at <= now


def action_for(sb: Expiring) -> ExpiryAction:
    """What expiring ``sb`` means (whether it is due is :func:`is_due`'s question)."""
    if sb.on_expire is OnExpire.DESTROY:
        return Destroy(sb.id)
    state = State(sb.status, sb.thermal)
    stop = lookup(Op.STOP, state)
    if stop is not None and stop.next != state:
        return Stop(sb.id)
    return Disarm(sb.id)


def decide(
    now: float, sandboxes: Iterable[Expiring], busy: Collection[str] = ()
) -> list[ExpiryAction]:
    """The actions due at ``now``, soonest expiry first; ``busy`` ids (being created,
    or waiting for a retry) are left for a later tick."""
    due = sorted(
        (sb for sb in sandboxes if sb.id not in busy and is_due(now, sb)),
        key=lambda sb: (sb.expires_at, sb.id),
    )
    return [action_for(sb) for sb in due]


class ExpiryReaper:
    """Every ``tick_s``: list the sandboxes with an expiry, :func:`decide`, act.

    :meth:`run` is the loop (the daemon's task group owns it); :meth:`stop`
    ends it after the action in progress, so a destroy or snapshot is never
    cut in half by a shutdown. A failure on one sandbox is logged and retried
    after ``retry_s``; nothing but :meth:`stop` or cancellation ends the loop.
    """

    def __init__(
        self,
        sandboxes: SandboxService,
        *,
        clock: Clock | None = None,
        tick_s: float = TICK_S,
        retry_s: float = RETRY_S,
    ) -> None:
        if not tick_s > 0 or retry_s < 0:
            raise ValueError("ExpiryReaper: tick_s must be positive, retry_s not negative")
        self._sandboxes = sandboxes
        self._clock: Clock = clock or SystemClock()
        self.tick_s = tick_s
        self.retry_s = retry_s
        self._retry_at: dict[str, float] = {}
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask :meth:`run` to return (after the current action, without waiting a tick)."""
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.tick()
            except Exception:  # tick() contains per-sandbox errors; this is a last resort
                log.exception("expiry tick failed")
            await self._pause()

    async def _pause(self) -> None:
        """One tick of the clock, or less when :meth:`stop` is called meanwhile."""
        async with asyncio.TaskGroup() as tg:
            sleeper = tg.create_task(self._clock.sleep(self.tick_s))
            stopper = tg.create_task(self._stopping.wait())
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            stopper.cancel()

    async def tick(self) -> list[ExpiryAction]:
        """Apply every expiry due now; return the actions carried out."""
        now = self._clock.now()
        try:
            node = self._sandboxes.node
            store = self._sandboxes.store
            # In a cluster each node reaps its own sandboxes (its engine runs them).
            rows = store.list_expiring() if node is None else store.list_expiring(node=node)
        except StoreError as exc:
            log.warning("expiry: cannot list sandboxes: %s", exc)
            return []
        self._retry_at = {k: t for k, t in self._retry_at.items() if t > now}
        busy = self._sandboxes.creating | self._retry_at.keys()
        done: list[ExpiryAction] = []
        for action in decide(now, rows, busy):
            if self._stopping.is_set():
                break
            try:
                applied = await self._sandboxes.expire(action.id, now)
            except Exception as exc:  # engine, store, or a bug: this sandbox only
                log.warning(
                    "expiry: sandbox %s: %s failed (retry in %.0f s): %s",
                    action.id,
                    type(action).__name__.lower(),
                    self.retry_s,
                    exc,
                )
                self._retry_at[action.id] = now + self.retry_s
                continue
            if applied is not None:
                done.append(applied)
        return done
