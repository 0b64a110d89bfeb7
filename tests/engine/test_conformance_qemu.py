"""The engine conformance suite against the QEMU engine: real microVMs (TCG here).

The main home is the module's network namespace and data directory
(``vm_env``); every other home gets a namespace and data directory of its own,
so a ``cleanup_orphans`` there cannot see the main home's VMs (nor take their
addresses: each home has its own pool). All sandboxes share one shape (1 vCPU,
256 MB), so each home boots one template and restores every sandbox from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.engine.base import Engine, SandboxSpec
from kiln.engine.qemu import QemuEngine
from kiln.engine.qemu.process import find_processes
from kiln.engine.testing import MAIN_HOME, EngineConformance

from .conftest import VMEnv, ip, kill_leftovers, link_exists, wait_until

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

MEMORY_MB = 256


def _qemu(engine: Engine) -> QemuEngine:
    assert isinstance(engine, QemuEngine), engine
    return engine


class QemuKit:
    has_ip = True
    known_failures: dict[str, str] = {}

    def __init__(self, main: VMEnv, scratch: Path) -> None:
        self._envs = {MAIN_HOME: main}
        self._scratch = scratch
        self._own_netns: list[str] = []

    def env(self, home: str) -> VMEnv:
        env = self._envs.get(home)
        if env is None:
            name = f"kt-{secrets.token_hex(4)}"
            created = ip("netns", "add", name)
            assert created.returncode == 0, created.stderr
            self._own_netns.append(name)
            data = self._scratch / home
            data.mkdir()
            env = self._envs[home] = VMEnv(name, data)
        return env

    @contextlib.asynccontextmanager
    async def engine(self, home: str = MAIN_HOME) -> AsyncIterator[Engine]:
        engine = QemuEngine(self.env(home).config())
        try:
            yield engine
        finally:
            await engine.close()

    def spec(self, sandbox_id: str, **overrides: Any) -> SandboxSpec:
        fields: dict[str, Any] = {
            "sandbox_id": sandbox_id,
            "name": sandbox_id,
            "memory_mb": MEMORY_MB,
            **overrides,
        }
        return SandboxSpec(**fields)

    def workdir(self, engine: Engine, sandbox_id: str) -> str:
        return "/workspace"

    async def kill_machine(self, engine: Engine, sandbox_id: str) -> None:
        qemu = _qemu(engine)
        pid = qemu.pid(sandbox_id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        marker = f"{qemu.paths(sandbox_id).root}/"
        await wait_until(lambda: pid not in find_processes(marker))

    async def lose_disk(self, engine: Engine, sandbox_id: str) -> None:
        rootfs = engine.export_state(sandbox_id)["record"]["drives"][0]["path"]
        await asyncio.to_thread(os.unlink, rootfs)

    async def leftovers(self, engine: Engine, sandbox_id: str) -> list[str]:
        qemu = _qemu(engine)
        root = qemu.config.sandboxes_dir / sandbox_id
        found = [f"qemu pid {pid}" for pid in find_processes(f"{root}/")]
        if root.exists():
            found.append(f"directory {root}")
        netns = qemu.config.network.netns
        assert netns is not None
        tap = qemu.network.tap_name(sandbox_id)
        if await asyncio.to_thread(link_exists, netns, tap):
            found.append(f"tap {tap}")
        found += [
            f"address {addr}" for addr, owner in qemu.pool.in_use().items() if owner == sandbox_id
        ]
        # The host's ARP entry for the guest, pinned to its MAC while it exists.
        mac = qemu.network.mac_for(sandbox_id).lower()
        neighbours = await asyncio.to_thread(ip, "-n", netns, "neigh", "show")
        found += [f"neighbour {line}" for line in neighbours.stdout.splitlines() if mac in line]
        return found

    def close(self) -> None:
        """Kill what failed tests left in the extra homes and delete their namespaces
        (``vm_env`` does that for the main home)."""
        for home, env in self._envs.items():
            if home != MAIN_HOME:
                kill_leftovers(env.marker)
        for name in self._own_netns:
            ip("netns", "del", name)


@pytest.fixture(scope="module")
def kit(vm_env: VMEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuKit]:
    kit = QemuKit(vm_env, tmp_path_factory.mktemp("qemu-homes"))
    try:
        yield kit
    finally:
        kit.close()


class TestQemuEngineConformance(EngineConformance):
    pass
