"""An engine's side of the host firewall (:mod:`kiln.network.firewall`).

Every engine admits a sandbox to the firewall once it has its address and
before the guest runs anything (the init script may open connections at boot),
and releases it when the sandbox is gone. Admitting raises an
:class:`~kiln.engine.errors.EngineError` (the create fails: a sandbox never runs
without its rules); releasing only logs, so a destroy goes on with the rest.
Without a firewall (tests of an engine alone) both do nothing.
"""

from __future__ import annotations

import asyncio
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

    async def release(self, sandbox_id: str) -> None:
        if self.firewall is None:
            return
        try:
            await asyncio.to_thread(self.firewall.release, sandbox_id)
        except NetworkError as exc:
            log.warning("could not remove the firewall rules of %s: %s", sandbox_id, exc)
