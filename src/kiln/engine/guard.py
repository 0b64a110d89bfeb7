"""An engine's side of the host firewall (:mod:`kiln.network.firewall`).

Every engine admits a sandbox to the firewall once it has its address and
before the guest runs anything (the init script may open connections at boot),
and releases it when the sandbox is gone. Admitting raises an
:class:`~kiln.engine.errors.EngineError` (the create fails: a sandbox never runs
without its rules); releasing only logs, so a destroy goes on with the rest.
Without a firewall (tests of an engine alone) both do nothing.

An update takes 20-40 ms (one ``nft`` run), so a create starts it with
:meth:`Guard.admit_soon` and waits for it only right before the guest starts,
while disks and containers are made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kiln.network import NetworkError
from kiln.network.firewall import Firewall, Member

from .base import SandboxSpec
from .errors import EngineError

log = logging.getLogger(__name__)


class Guard:
    def __init__(self, firewall: Firewall | None) -> None:
        self.firewall = firewall

    async def admit(
        self, spec: SandboxSpec, ip: str, port: str | None = None, mac: str | None = None
    ) -> None:
        firewall = self.firewall
        if firewall is None:
            return
        policy = spec.network if spec.network is not None else firewall.config.default
        member = Member(spec.sandbox_id, ip, spec.owner, policy, port=port, mac=mac)
        try:
            await asyncio.to_thread(firewall.admit, member)
        except NetworkError as exc:
            raise EngineError(
                f"cannot install the firewall rules of {spec.sandbox_id}: {exc}"
            ) from exc

    async def transfer(
        self, old_id: str, spec: SandboxSpec, ip: str, port: str | None, mac: str | None
    ) -> None:
        """:meth:`admit` ``spec`` in place of sandbox ``old_id``'s rules, in one update (a
        warm-pool member becoming the sandbox of ``spec``: same address and port)."""
        firewall = self.firewall
        if firewall is None:
            return
        policy = spec.network if spec.network is not None else firewall.config.default
        member = Member(spec.sandbox_id, ip, spec.owner, policy, port=port, mac=mac)
        try:
            await asyncio.to_thread(firewall.transfer, old_id, member)
        except NetworkError as exc:
            raise EngineError(
                f"cannot install the firewall rules of {spec.sandbox_id}: {exc}"
            ) from exc

    def admit_soon(
        self, spec: SandboxSpec, ip: str, port: str | None = None, mac: str | None = None
    ) -> Admission:
        """:meth:`admit`, started now; :meth:`Admission.wait` for it before the guest runs."""
        task = asyncio.create_task(self.admit(spec, ip, port, mac), name=f"admit {ip}")
        return Admission(self, spec.sandbox_id, task)

    async def release(self, sandbox_id: str) -> None:
        if self.firewall is None:
            return
        try:
            await asyncio.to_thread(self.firewall.release, sandbox_id)
        except NetworkError as exc:
            log.warning("could not remove the firewall rules of %s: %s", sandbox_id, exc)


class Admission:
    """An admit under way (:meth:`Guard.admit_soon`)."""

    def __init__(self, guard: Guard, sandbox_id: str, task: asyncio.Task[None]) -> None:
        self._guard = guard
        self._sandbox_id = sandbox_id
        self._task = task

    async def wait(self) -> None:
        """Until the rules are in; raises what the admit raised."""
        await self._task

    async def undo(self) -> None:
        """Wait for the admit whatever it does, then remove whatever it installed."""
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(self._task)
        await self._guard.release(self._sandbox_id)
