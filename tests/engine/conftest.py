"""Fixtures for real-VM engine tests.

Every module that boots VMs gets its own named network namespace
(``kt-<random>``), created here and deleted in a finalizer even when tests
fail, and hands it to the engine through ``NetworkConfig.netns``. So the tests
are safe without ``scripts/test``'s ``unshare --net`` too, and they exercise the
product's netns option. Whatever QEMU a test leaves behind is killed by pid
(found by the module's data directory on its command line) before the
namespace goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from kiln.engine.qemu import QemuConfig, QemuEngine
from kiln.engine.qemu.process import find_processes
from kiln.network import NetworkConfig


def vm_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (TAP devices, network namespaces)"
    for tool in ("qemu-system-x86_64", "ip", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def dir_exists(path: str | Path) -> bool:
    return Path(path).is_dir()


def link_exists(netns: str, name: str) -> bool:
    return ip("-n", netns, "link", "show", "dev", name).returncode == 0


def kill_leftovers(marker: str) -> list[int]:
    """SIGKILL every process whose command line contains ``marker``; return their pids."""
    pids = find_processes(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while find_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids


@dataclass
class VMEnv:
    netns: str
    data_dir: Path
    subnet: str = "10.213.7.0/24"
    bridge: str = "kt-br0"

    def config(self, **changes: object) -> QemuConfig:
        network = NetworkConfig(
            bridge=self.bridge, subnet=self.subnet, netns=self.netns, nat=False, dns=("10.213.7.1",)
        )
        base: dict[str, object] = {
            "data_dir": self.data_dir,
            "network": network,
            "boot_timeout": 150.0,
        }
        base.update(changes)
        return QemuConfig(**base)  # type: ignore[arg-type]

    @property
    def marker(self) -> str:
        return f"{self.data_dir}/"


@pytest.fixture(scope="module")
def vm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMEnv]:
    """A fresh network namespace and data directory for one test module."""
    reason = vm_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"kt-{secrets.token_hex(4)}"
    created = ip("netns", "add", name)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    env = VMEnv(name, tmp_path_factory.mktemp("qemu"))
    try:
        yield env
    finally:
        leftovers = kill_leftovers(env.marker)
        ip("netns", "del", name)
        assert not leftovers, f"QEMU processes left behind: {leftovers}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(vm_env: VMEnv) -> AsyncIterator[QemuEngine]:
    """One engine per module; every sandbox it still holds is destroyed at the end."""
    eng = QemuEngine(vm_env.config())
    try:
        yield eng
    finally:
        for info in eng.list():
            await eng.destroy(info.sandbox_id)
        await eng.close()


async def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> None:  # noqa: ASYNC109
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
