"""The thermal manager: every tick, gather views, :func:`decide`, act.

Wiring in the daemon::

    manager = ThermalManager(
        engine,
        sandboxes=lambda: store.list_live_sandboxes(engine.name),
        on_change=persist_thermal,            # (sandbox_id, Thermal) -> None
    )
    tg.create_task(manager.run())             # or: manager.start() … await manager.aclose()
    ...
    manager.touch(sandbox_id)                 # from every API call that used the sandbox

Sources of truth: the store (through ``sandboxes``) for status, ``keep_hot`` and
the persisted ``last_active_at``; the engine for the live thermal state;
:meth:`ThermalManager.touch` for host-side activity since; the guest agent (hot
sandboxes only, and only when the host side has been quiet) for sessions and
in-guest activity.

A failure concerning one sandbox (engine error, agent timeout, callback error)
is logged and the tick goes on; nothing but cancellation ends the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import NoReturn, Protocol, Self

from kiln.engine.base import Engine, Status, Thermal
from kiln.engine.states import Op, State, plan
from kiln.protocol import ActivityInfo

from .clock import Clock, SystemClock
from .policy import Action, Pause, SandboxView, Stop, ThermalPolicy, decide, needs_agent_query

log = logging.getLogger("kiln.thermal")


class Tracked(Protocol):
    """What the manager needs from a stored sandbox (``kiln.store.Sandbox`` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> Status: ...
    @property
    def keep_hot(self) -> bool: ...
    @property
    def last_active_at(self) -> float: ...


SandboxSource = Callable[[], Iterable[Tracked]]
ActivitySource = Callable[[str], Awaitable[ActivityInfo]]
ChangeCallback = Callable[[str, Thermal], None]


def engine_activity_source(engine: Engine) -> ActivitySource:
    """Ask the sandbox's guest agent (the manager only calls this for hot sandboxes)."""

    async def activity(sandbox_id: str) -> ActivityInfo:
        client = await engine.agent(sandbox_id)
        return await client.activity()

    return activity


class ThermalManager:
    def __init__(
        self,
        engine: Engine,
        *,
        sandboxes: SandboxSource,
        clock: Clock | None = None,
        policy: ThermalPolicy | None = None,
        activity_source: ActivitySource | None = None,
        on_change: ChangeCallback | None = None,
    ) -> None:
        self.engine = engine
        self.policy = policy or ThermalPolicy()
        self._sandboxes = sandboxes
        self._clock: Clock = clock or SystemClock()
        self._activity = activity_source or engine_activity_source(engine)
        self._on_change = on_change
        self._touched: dict[str, float] = {}  # host-side activity not yet in the store
        self._seen: dict[str, tuple[Thermal, float]] = {}  # thermal state, since when
        self._unavailable: set[str] = set()  # engine cannot tell its state (logged once)
        self._task: asyncio.Task[NoReturn] | None = None

    # --- called by the server -------------------------------------------------------------

    def touch(self, sandbox_id: str, when: float | None = None) -> None:
        """Record host-side activity (an API call, proxied traffic) on a sandbox."""
        when = self._clock.now() if when is None else when
        if when > self._touched.get(sandbox_id, float("-inf")):
            self._touched[sandbox_id] = when

    def last_touch(self, sandbox_id: str) -> float | None:
        return self._touched.get(sandbox_id)

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> NoReturn:
        """Tick forever; cancel the task to stop."""
        while True:
            try:
                await self.tick()
            except Exception:  # tick() contains per-sandbox errors; this is a last resort
                log.exception("thermal tick failed")
            await self._clock.sleep(self.policy.tick_s)

    def start(self) -> None:
        """Run the loop in a task this manager owns; :meth:`aclose` ends and awaits it."""
        if self._task is not None:
            raise RuntimeError("thermal manager already started")
        self._task = asyncio.create_task(self.run(), name="kiln-thermal")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Our own cancellation of the task; re-raise if *we* are being cancelled.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- one tick -------------------------------------------------------------------------

    async def tick(self) -> list[Action]:
        """Gather views, decide, act; return the actions that succeeded."""
        now = self._clock.now()
        views = await self._views(now)
        actions = decide(now, views, self.policy)
        seen = {v.id: State(v.status, v.thermal) for v in views}
        done: list[Action] = []
        for action in actions:
            if await self._act(action, seen[action.id], decided_at=now):
                done.append(action)
        return done

    async def _views(self, now: float) -> list[SandboxView]:
        try:
            rows = list(self._sandboxes())
        except Exception:
            log.exception("thermal: cannot list sandboxes")
            return []
        live = {row.id for row in rows}
        for stale in self._seen.keys() - live:
            del self._seen[stale]
        for stale in self._touched.keys() - live:
            del self._touched[stale]
        self._unavailable &= live

        views: list[SandboxView] = []
        for row in rows:
            if row.status is not Status.RUNNING:
                continue  # stopped, errored, unknown: never the manager's business
            try:
                info = self.engine.info(row.id)
            except Exception as exc:  # EngineError, or an engine bug: this sandbox only
                if row.id not in self._unavailable:  # once, not every tick
                    log.warning("thermal: no state for sandbox %s: %s", row.id, exc)
                    self._unavailable.add(row.id)
                continue
            self._unavailable.discard(row.id)
            thermal = info.thermal
            seen = self._seen.get(row.id)
            if seen is None or seen[0] is not thermal:
                seen = self._seen[row.id] = (thermal, now)
            host = max(row.last_active_at, self._touched.get(row.id, float("-inf")))
            views.append(
                SandboxView(
                    id=row.id,
                    thermal=thermal,
                    status=row.status,
                    keep_hot=row.keep_hot,
                    state_since=seen[1],
                    host_activity=host,
                    capabilities=info.capabilities,
                )
            )

        to_ask = [v for v in views if needs_agent_query(now, v, self.policy)]
        if not to_ask:
            return views
        async with asyncio.TaskGroup() as tg:
            tasks = {v.id: tg.create_task(self._ask(v.id)) for v in to_ask}
        answers = {sid: task.result() for sid, task in tasks.items()}
        return [dataclasses.replace(v, agent=answers.get(v.id)) for v in views]

    async def _ask(self, sandbox_id: str) -> ActivityInfo | None:
        try:
            async with asyncio.timeout(self.policy.query_timeout_s):
                return await self._activity(sandbox_id)
        except TimeoutError:
            log.warning("thermal: sandbox %s: agent activity query timed out", sandbox_id)
        except Exception as exc:
            log.warning("thermal: sandbox %s: agent activity query failed: %s", sandbox_id, exc)
        return None

    async def _act(self, action: Action, decided_on: State, *, decided_at: float) -> bool:
        sandbox_id = action.id
        if self._touched.get(sandbox_id, float("-inf")) > decided_at:
            return False  # used while we were deciding: not idle after all
        try:
            if self.engine.thermal(sandbox_id) is not decided_on.thermal:
                return False  # woken (or already moved) by someone else meanwhile
            step = plan(_OPS[type(action)], decided_on, sandbox_id)
            match action:
                case Pause():
                    await self.engine.pause(sandbox_id)
                case Stop():
                    await self.engine.stop(sandbox_id)
        except Exception as exc:
            log.warning("thermal: %s of sandbox %s failed: %s", _verb(action), sandbox_id, exc)
            return False
        target = step.next.thermal
        self._seen[sandbox_id] = (target, self._clock.now())
        log.info("thermal: sandbox %s %s → %s", sandbox_id, decided_on.thermal, target)
        if self._on_change is not None:
            try:
                self._on_change(sandbox_id, target)
            except Exception:
                log.exception("thermal: on_change callback failed for sandbox %s", sandbox_id)
        return True


#: The transition each decision asks of the table: the cold step keeps the sandbox
#: running (unlike the user's stop).
_OPS: dict[type[Action], Op] = {Pause: Op.PAUSE, Stop: Op.COOL}


def _verb(action: Action) -> str:
    return "pause" if isinstance(action, Pause) else "stop"
