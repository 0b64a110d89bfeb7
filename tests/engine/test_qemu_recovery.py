"""Daemon recovery with real VMs: a new engine re-adopts what the old one left.

A "daemon crash" is an engine object dropped without destroying anything
(``close`` only lets go of QMP connections); QEMU runs in its own session and
survives. One VM is booted for the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from kiln.engine import SandboxCrashed, SandboxSpec, Status, Thermal
from kiln.engine.qemu import QemuEngine
from kiln.engine.qemu.process import find_processes, pid_alive

from .conftest import VMEnv, dir_exists, link_exists, wait_until

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
]

SID = "delta"


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """What the daemon's store gives back: the state through JSON."""
    out: dict[str, Any] = json.loads(json.dumps(state))
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def first(vm_env: VMEnv) -> AsyncIterator[dict[str, Any]]:
    """Boot the VM with a first engine, write some data, then 'crash' that engine.

    The tests below pass states along in this dict; vm_env's finalizer kills any
    QEMU still running at the end.
    """
    engine = QemuEngine(vm_env.config())
    await engine.create(SandboxSpec(sandbox_id=SID, name=SID, memory_mb=256))
    client = await engine.agent(SID)
    await client.exec(["sh", "-c", "echo survived > /home/sandbox/mark"])
    state = roundtrip(engine.export_state(SID))
    await engine.close()  # the daemon dies; QEMU does not
    yield state


async def reopen(vm_env: VMEnv, state: dict[str, Any]) -> QemuEngine:
    engine = QemuEngine(vm_env.config())
    info = await engine.import_state(state)
    assert info.sandbox_id == SID
    return engine


async def test_export_state_is_json_and_names_the_essentials(first: dict[str, Any]) -> None:
    assert first["engine"] == "qemu" and first["sandbox_id"] == SID
    assert first["thermal"] == "hot" and first["status"] == "running"
    assert isinstance(first["pid"], int)
    record = first["record"]
    assert record["ip"] == "10.213.7.2" and record["tap"].startswith("ktap")
    assert record["spec"]["memory_mb"] == 256
    assert first["snapshot_valid"] is False


async def test_a_live_vm_is_readopted_hot(vm_env: VMEnv, first: dict[str, Any]) -> None:
    engine = await reopen(vm_env, first)
    try:
        info = engine.info(SID)
        assert (info.status, info.thermal) == (Status.RUNNING, Thermal.HOT)
        assert engine.pool.owner_of("10.213.7.2") == SID  # the IP is marked again
        assert engine.pid(SID) == first["pid"]
        client = await engine.agent(SID)
        assert (await client.exec(["cat", "/home/sandbox/mark"])).stdout == b"survived\n"
        await engine.pause(SID)  # QMP works through the new connection
        first["paused"] = roundtrip(engine.export_state(SID))
    finally:
        await engine.close()


async def test_a_paused_vm_is_readopted_warm(vm_env: VMEnv, first: dict[str, Any]) -> None:
    engine = await reopen(vm_env, first["paused"])
    try:
        assert engine.thermal(SID) is Thermal.WARM
        await engine.ensure_hot(SID)
        client = await engine.agent(SID)
        assert (await client.exec(["true"])).exit_code == 0
        await engine.stop(SID)
        first["cold"] = roundtrip(engine.export_state(SID))
    finally:
        await engine.close()


async def test_a_cold_vm_is_readopted_from_its_snapshot(
    vm_env: VMEnv, first: dict[str, Any]
) -> None:
    state = first["cold"]
    assert state["thermal"] == "cold" and state["snapshot_valid"] is True
    engine = await reopen(vm_env, state)
    try:
        info = engine.info(SID)
        assert (info.status, info.thermal, info.has_snapshot) == (
            Status.RUNNING,
            Thermal.COLD,
            True,
        )
        await engine.start(SID)
        client = await engine.agent(SID)
        assert (await client.exec(["cat", "/home/sandbox/mark"])).stdout == b"survived\n"
        first["hot_again"] = roundtrip(engine.export_state(SID))
    finally:
        await engine.close()


async def test_a_dead_vm_without_a_valid_snapshot_boots_again_from_its_disk(
    vm_env: VMEnv, first: dict[str, Any]
) -> None:
    state = first["hot_again"]
    # The snapshot was spent by the restore, and now QEMU dies with the daemon (and the
    # host's network with it: a reboot).
    os.kill(state["pid"], signal.SIGKILL)
    paths_marker = f"{state['record']['dir']}/"
    await wait_until(lambda: not pid_alive(state["pid"], paths_marker))
    tap = state["record"]["tap"]
    await asyncio.to_thread(
        subprocess.run, ["ip", "-n", vm_env.netns, "link", "del", tap], check=True
    )
    engine = await reopen(vm_env, state)
    try:
        info = engine.info(SID)
        assert (info.status, info.thermal, info.has_snapshot) == (
            Status.RUNNING,
            Thermal.COLD,
            False,
        )
        assert info.last_boot is not None and info.last_boot.reason == "restored"
        assert link_exists(vm_env.netns, tap)  # re-created for the boot to come
        client = await engine.agent(SID)  # its next use boots it
        assert (await client.exec(["cat", "/home/sandbox/mark"])).stdout == b"survived\n"
        info = engine.info(SID)
        assert (info.status, info.thermal) == (Status.RUNNING, Thermal.HOT)
        assert info.last_boot is not None and info.last_boot.reason == "rebooted"
        assert info.ip == "10.213.7.2" and engine.pool.owner_of(info.ip) == SID
        first["rebooted"] = roundtrip(engine.export_state(SID))
        assert first["rebooted"]["last_boot"]["reason"] == "rebooted"
    finally:
        await engine.close()


async def test_a_vm_whose_disk_is_gone_is_in_error_and_destroyable(
    vm_env: VMEnv, first: dict[str, Any]
) -> None:
    state = first["rebooted"]
    os.kill(state["pid"], signal.SIGKILL)
    paths_marker = f"{state['record']['dir']}/"
    await wait_until(lambda: not pid_alive(state["pid"], paths_marker))
    rootfs = state["record"]["drives"][0]["path"]
    os.unlink(rootfs)
    engine = await reopen(vm_env, state)
    try:
        info = engine.info(SID)
        assert (info.status, info.thermal) == (Status.ERROR, Thermal.COLD)
        assert info.problem == f"its disk {rootfs} is missing"
        with pytest.raises(SandboxCrashed):
            await engine.ensure_hot(SID)
        await engine.destroy(SID)
        assert not link_exists(vm_env.netns, state["record"]["tap"])
        assert engine.pool.in_use() == {}
        assert not dir_exists(state["record"]["dir"])
    finally:
        await engine.close()


async def test_orphans_are_cleaned_up(vm_env: VMEnv) -> None:
    """A sandbox the store no longer knows: its QEMU, TAP and directory go; so do a
    template build's leftovers (its QEMU, a directory it never finished)."""
    engine = QemuEngine(vm_env.config())
    builder: asyncio.subprocess.Process | None = None
    try:
        await engine.create(SandboxSpec(sandbox_id="orphan", name="orphan", memory_mb=256))
        tap = engine.network.tap_name("orphan")
        root = engine.paths("orphan").root
        (finished,) = engine.config.templates_dir.iterdir()
        half_built = engine.config.templates_dir / "half-built"
        half_built.mkdir()
        # Stands in for a template QEMU whose daemon died mid-build.
        builder = await asyncio.create_subprocess_exec("sh", "-c", "sleep 600", f"{half_built}/q")
        await engine.close()  # crash; the store lost the row
        engine = QemuEngine(vm_env.config())
        removed = await engine.cleanup_orphans()
        assert any("orphan" in r for r in removed)
        assert not find_processes(f"{root}/")
        assert not link_exists(vm_env.netns, tap)
        assert not root.exists()
        assert await asyncio.wait_for(builder.wait(), 10) != 0 and not half_built.exists()
        assert finished.is_dir()  # a finished template is no leftover
    finally:
        if builder is not None and builder.returncode is None:
            builder.kill()
            await builder.wait()
        await engine.close()
