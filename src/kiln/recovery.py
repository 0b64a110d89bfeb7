"""Daemon start-up recovery: re-adopt every live sandbox the store knows.

For each live sandbox row of this engine, ``engine.import_state(row.engine_state)``
tells what survived the previous daemon (the engine's side of that is
:data:`kiln.engine.states.ADOPTED`), and the row is updated to the state
:func:`kiln.engine.states.recovered` gives (no state saved, or an import that
failed, count as nothing found: ``unknown``). In short: a live VM stays
running; a snapshot makes it stopped, unless it was already running cold; a
sandbox that was running hot when the daemon died and whose VM did not survive
is *stopped* rather than silently restored: its snapshot is older than the
state it was in, and the user should choose to start it.

A sandbox whose machine is gone without a usable snapshot but whose disks are
intact (a host reboot killed its QEMU, or dockerd's containers) is *rebooted*:
running and cold, and its next use -- an exec, a file read, a start -- boots
it again from its own disks, like a machine after a power cut: its files are
kept, its processes are lost, and its ``last_boot`` then says ``rebooted``.
It is booted on next use rather than here so that a daemon with many such
sandboxes serves at once, and boots only the ones somebody uses (a boot takes
seconds under TCG). Only a sandbox whose disks are gone is ``error``, with the
reason in the report and in the error its next use gets.

Deleted sandboxes and sandboxes of other engines are left alone. One sandbox's
failure never stops the others; the report lists it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass

from kiln.engine.base import Engine, SandboxInfo, Status, Thermal
from kiln.engine.router import ENGINE_KEY
from kiln.engine.states import State, rebooted, recovered
from kiln.store import Sandbox, Store

log = logging.getLogger("kiln.recovery")

DEFAULT_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class Recovered:
    """What recovery did to one sandbox."""

    sandbox_id: str
    previous: tuple[Status, Thermal]
    status: Status
    thermal: Thermal
    error: str | None = None  # why it could not be re-adopted
    #: Its machine was gone but its disks were not: its next use boots it from them.
    rebooted: bool = False


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    outcomes: tuple[Recovered, ...] = ()
    skipped: tuple[str, ...] = ()  # live sandboxes of other engines

    @property
    def running(self) -> list[str]:
        return [o.sandbox_id for o in self.outcomes if o.status is Status.RUNNING]

    @property
    def stopped(self) -> list[str]:
        return [o.sandbox_id for o in self.outcomes if o.status is Status.STOPPED]

    @property
    def rebooted(self) -> list[str]:
        return [o.sandbox_id for o in self.outcomes if o.rebooted]

    @property
    def unknown(self) -> list[str]:
        return [o.sandbox_id for o in self.outcomes if o.status is Status.UNKNOWN]

    @property
    def failed(self) -> list[Recovered]:
        return [o for o in self.outcomes if o.error is not None]

    def outcome(self, sandbox_id: str) -> Recovered:
        for o in self.outcomes:
            if o.sandbox_id == sandbox_id:
                return o
        raise KeyError(sandbox_id)


def recovered_state(row: Sandbox, info: SandboxInfo | None) -> State:
    """The state a sandbox gets after recovery (:func:`kiln.engine.states.recovered`)."""
    stored = State(row.status, row.thermal)
    if info is None:
        return recovered(stored, None, has_snapshot=False)
    return recovered(stored, info.state, has_snapshot=info.has_snapshot)


async def recover(
    store: Store,
    engine: Engine,
    *,
    engine_name: str | None = None,
    engine_names: Collection[str] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    node: str | None = None,
) -> RecoveryReport:
    """Re-adopt every live sandbox of ``engine_names`` (default: ``engine_name``, else
    ``engine.name``); an engine router takes them all. ``node``: in a cluster, this
    node's name: only its sandboxes are recovered (another node's are never touched)."""
    if engine_names is None:
        engine_names = (engine.name if engine_name is None else engine_name,)
    names = set(engine_names)
    rows = store.list_live_sandboxes() if node is None else store.list_live_sandboxes(node=node)
    mine = [r for r in rows if r.engine in names]
    skipped = tuple(r.id for r in rows if r.engine not in names)
    limit = asyncio.Semaphore(max(1, concurrency))

    async def one(row: Sandbox) -> Recovered:
        async with limit:
            return await _recover_one(store, engine, row)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(row)) for row in mine]
    report = RecoveryReport(tuple(t.result() for t in tasks), skipped)
    log.info(
        "recovery: %d running (%d rebooted), %d stopped, %d unknown, %d failed,"
        " %d of other engines",
        len(report.running),
        len(report.rebooted),
        len(report.stopped),
        len(report.unknown),
        len(report.failed),
        len(skipped),
    )
    return report


async def _recover_one(store: Store, engine: Engine, row: Sandbox) -> Recovered:
    previous = (row.status, row.thermal)
    info: SandboxInfo | None = None
    error: str | None = None
    if row.engine_state is None:
        error = "no engine state was saved"
    else:
        try:
            # States saved before engines were routed do not name theirs; the row does.
            info = await engine.import_state({ENGINE_KEY: row.engine, **row.engine_state})
            if info.sandbox_id != row.id:
                raise ValueError(f"engine re-adopted {info.sandbox_id!r} instead")
        except Exception as exc:
            info, error = None, f"{type(exc).__name__}: {exc}"
    if info is not None and info.problem is not None:
        error = info.problem
    status, thermal = recovered_state(row, info)
    boots = (
        info is not None
        and status is Status.RUNNING
        and rebooted(info.state, has_snapshot=info.has_snapshot)
    )
    try:
        if info is None:
            store.update_sandbox(row.id, status=status, thermal=thermal)
        else:
            store.update_sandbox(
                row.id,
                status=status,
                thermal=thermal,
                ip=info.ip,
                engine_state=_export(engine, row),
            )
    except Exception as exc:
        log.error("recovery: sandbox %s: cannot update its row: %s", row.id, exc)
        error = error or f"{type(exc).__name__}: {exc}"
    if error is not None:
        log.warning("recovery: sandbox %s is %s: %s", row.id, status, error)
    elif boots:
        log.info(
            "recovery: sandbox %s: %s/%s → %s/%s, rebooted: its machine is gone, its disks"
            " are not; its next use boots it from them (files kept, processes lost)",
            row.id,
            *previous,
            status,
            thermal,
        )
    else:
        log.info("recovery: sandbox %s: %s/%s → %s/%s", row.id, *previous, status, thermal)
    return Recovered(row.id, previous, status, thermal, error, rebooted=boots)


def _export(engine: Engine, row: Sandbox) -> dict[str, object] | None:
    """The engine's fresh state for the row; the old one if the engine cannot export."""
    try:
        return dict(engine.export_state(row.id))
    except Exception as exc:
        log.warning("recovery: sandbox %s: export_state failed, keeping old state: %s", row.id, exc)
        return None if row.engine_state is None else dict(row.engine_state)
