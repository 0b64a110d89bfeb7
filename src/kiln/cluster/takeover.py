"""A lost node's sandboxes taken over by a live node; a draining node's stopped
sandboxes moved to others. Both need ``cluster.shared_dir``: a directory every node
mounts, where the QEMU engine keeps its sandboxes' files (see
:mod:`kiln.engine.qemu.adoption`).

Taking over happens on a sandbox's next use: a request for a sandbox whose node
is *lost* (its lease ran out) makes the node it reached take the sandbox over
(:meth:`Takeover.take_over`). The store moves the row first, in one conditional
update (:meth:`~kiln.store.Store.claim_sandbox`: only from a node that is lost,
only once -- of two nodes racing, one wins and the other learns which, and
relays there), then the engine adopts the files
(:meth:`~kiln.engine.base.Engine.adopt`): a cold sandbox is restored here with
its processes, one whose machine died with its node boots from its disks on its
next use (files kept, processes lost: a reboot). One its user had stopped stays
stopped. When the engine cannot move it (a Docker container: its files are in
its node's dockerd), the row goes back to the lost node and the sandbox stays
reported as lost until that node returns.

A drain (:meth:`Takeover.move_stopped`, run on the draining node) gives each
stopped sandbox up (:meth:`~kiln.engine.base.Engine.release`: files kept) and
moves its row to another node, placed by capacity as a create is
(:class:`~.placement.Placer`), which adopts it when it next meets it: a row of
its own its engine does not hold (:meth:`Takeover.adopt_claimed`). Running
sandboxes stay until they are stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kiln.engine import Engine
from kiln.engine.errors import EngineError, SandboxNotFound
from kiln.engine.router import ENGINE_KEY
from kiln.engine.states import Status, Thermal
from kiln.recovery import recovered_state
from kiln.store import NodeState, NotFound, Sandbox, Store, StoreError

from .errors import ClusterError
from .placement import Placer, Shape

log = logging.getLogger(__name__)


class TakeoverRefused(ClusterError):
    """The sandbox cannot be taken over (its node is alive, or it cannot move)."""


class TakenElsewhere(ClusterError):
    """Another node took the sandbox over first, or should (``placed``: this one has
    no room, that one has); ``node`` names it."""

    def __init__(self, sandbox_id: str, node: str | None, *, placed: bool = False) -> None:
        what = "goes to" if placed else "was taken over by"
        super().__init__(f"sandbox {sandbox_id} {what} node {node!r}")
        self.node = node
        self.placed = placed


@dataclass(frozen=True, slots=True)
class Moved:
    """One sandbox a drain moved (``to``: its new node) or could not (``error``)."""

    sandbox_id: str
    to: str | None
    error: str | None = None


class Takeover:
    """This node's side of taking over and moving sandboxes (``node``: its name)."""

    def __init__(
        self, store: Store, engine: Engine, node: str, now: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.engine = engine
        self.node = node
        self._now = now
        self._placer = Placer(store, clock=now)
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def holds(self, sandbox_id: str) -> bool:
        """Whether this node's engine has the sandbox."""
        try:
            self.engine.info(sandbox_id)
        except (SandboxNotFound, EngineError):
            return False
        return True

    async def take_over(self, row: Sandbox, *, elsewhere: bool = True) -> Sandbox:
        """``row``, a sandbox of a lost node, made this node's (its row as it is now).
        TakeoverRefused if its node is not lost or it cannot move; TakenElsewhere if
        another node was first or, with ``elsewhere``, if this node has no room and
        placement chose another (the request goes there; without ``elsewhere``:
        TakeoverRefused)."""
        async with self._lock(row.id):
            home = row.node
            if home is None or home == self.node:
                return await self._adopt_if_missing(row)
            try:
                node = await asyncio.to_thread(self.store.get_node, home)
            except NotFound:
                raise TakeoverRefused(f"sandbox {row.id}: its node {home!r} is unknown") from None
            if not node.lost(self._now()):
                raise TakeoverRefused(f"sandbox {row.id}: its node {home} is alive")
            if row.engine_state is None:
                raise TakeoverRefused(f"sandbox {row.id}: its node {home} stored no state of it")
            # Placed as a create is, this node first: a lost node's sandboxes must
            # not overcommit the node that happens to be asked.
            shape = Shape(row.engine, row.cpus, row.memory_mb)
            try:
                target = await asyncio.to_thread(
                    self._placer.reserve, shape, (home,), prefer=self.node
                )
            except ClusterError as exc:
                raise TakeoverRefused(f"sandbox {row.id}: {exc}") from exc
            try:
                if target.name != self.node:
                    if not elsewhere:
                        raise TakeoverRefused(
                            f"sandbox {row.id}: this node has no room for it (node"
                            f" {target.name} has)"
                        )
                    raise TakenElsewhere(row.id, target.name, placed=True)
                return await self._claim_and_adopt(row, home)
            finally:
                await asyncio.to_thread(self._placer.release, target.name, shape)

    async def _claim_and_adopt(self, row: Sandbox, home: str) -> Sandbox:
        """Under the sandbox's lock, with room reserved here."""
        claimed = await asyncio.to_thread(
            self.store.claim_sandbox, row.id, from_node=home, to_node=self.node
        )
        if claimed is None:
            fresh = await asyncio.to_thread(self.store.get_sandbox, row.id)
            if fresh.node == self.node:  # we took it meanwhile (another request)
                return await self._adopt_if_missing(fresh)
            raise TakenElsewhere(row.id, fresh.node)
        try:
            return await self._adopt(claimed)
        except TakeoverRefused:
            # It cannot live here: back to its node, reported lost until it returns.
            await asyncio.to_thread(
                self.store.claim_sandbox,
                row.id,
                from_node=self.node,
                to_node=home,
                lost_only=False,
            )
            raise

    async def adopt_claimed(self, row: Sandbox) -> Sandbox:
        """A row of this node's that its engine does not hold (a drain moved it here,
        or a takeover died between the claim and the adopt), adopted now."""
        async with self._lock(row.id):
            return await self._adopt_if_missing(row)

    async def _adopt_if_missing(self, row: Sandbox) -> Sandbox:
        if self.holds(row.id):
            return row
        if row.engine_state is None:
            raise TakeoverRefused(f"sandbox {row.id}: no state of it was stored")
        return await self._adopt(row)

    async def _adopt(self, row: Sandbox) -> Sandbox:
        assert row.engine_state is not None
        state = {ENGINE_KEY: row.engine, **row.engine_state}
        try:
            stopped = row.status is Status.STOPPED
            info = await self.engine.adopt(state, hot=not stopped)
            if stopped and info.thermal is not Thermal.COLD:
                # Restored here to take its new address; its user had stopped it.
                info = await self.engine.stop(row.id)
        except EngineError as exc:
            raise TakeoverRefused(f"sandbox {row.id} cannot move here: {exc}") from exc
        status, thermal = recovered_state(row, info)
        moved = await asyncio.to_thread(
            self.store.update_sandbox,
            row.id,
            status=status,
            thermal=thermal,
            ip=info.ip,
            engine_state=self.engine.export_state(row.id),
        )
        log.info("sandbox %s taken over from node %s: %s/%s", row.id, row.node, status, thermal)
        return moved

    async def move_stopped(self, placer: Placer) -> Sequence[Moved]:
        """On a draining node: move every stopped sandbox of this node to a node the
        placer chooses (by capacity, as a create; none: it stays). Running ones stay."""
        rows = await asyncio.to_thread(self.store.list_live_sandboxes, None, node=self.node)
        out: list[Moved] = []
        for row in rows:
            if row.status is not Status.STOPPED or row.thermal is not Thermal.COLD:
                continue
            shape = Shape(row.engine, row.cpus, row.memory_mb)
            try:
                target = await asyncio.to_thread(placer.reserve, shape, (self.node,))
            except ClusterError as exc:
                out.append(Moved(row.id, None, str(exc)))
                continue
            try:
                # Shielded: a release without its claim would strand the sandbox here.
                out.append(await asyncio.shield(self._move(row, target.name)))
            finally:
                await asyncio.to_thread(placer.release, target.name, shape)
        return out

    async def drain(self, period: float) -> None:
        """While this node is draining, move its stopped sandboxes away, every
        ``period`` seconds (a sandbox stopped later goes at the next round)."""
        placer = Placer(self.store, clock=self._now)
        while True:
            await asyncio.sleep(period)
            try:
                me = await asyncio.to_thread(self.store.get_node, self.node)
                if me.state is not NodeState.DRAINING:
                    continue
                for moved in await self.move_stopped(placer):
                    if moved.error is not None:
                        log.warning("drain: sandbox %s stays: %s", moved.sandbox_id, moved.error)
            except StoreError as exc:
                log.warning("drain: %s", exc)

    async def _move(self, row: Sandbox, to: str) -> Moved:
        async with self._lock(row.id):
            try:
                state = await self.engine.release(row.id)
            except EngineError as exc:
                return Moved(row.id, None, str(exc))
            await asyncio.to_thread(self.store.set_engine_state, row.id, state)
            claimed = await asyncio.to_thread(
                self.store.claim_sandbox, row.id, from_node=self.node, to_node=to, lost_only=False
            )
            if claimed is None:
                return Moved(row.id, None, "its row changed meanwhile")
            log.info("drain: sandbox %s moved to node %s", row.id, to)
            return Moved(row.id, to)
