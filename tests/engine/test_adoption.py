"""A sandbox of a lost cluster node taken over by another (real TCG microVMs).

Two QEMU engines, nodes ``b`` and ``c``, with their own data directories, bridges
and subnets (in one test network namespace) and one shared directory: what node
``b`` made, node ``c`` adopts -- a cold one restored with its files and running
processes and ``c``'s address, a crashed one booted again from its disks -- and
``c``'s orphan cleanup leaves ``b``'s live sandboxes alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kiln.engine import SandboxSpec
from kiln.engine.errors import InvalidState
from kiln.engine.qemu import QemuConfig, QemuEngine
from kiln.engine.qemu.process import pid_alive
from kiln.network import NetworkConfig
from kiln.testing.cluster import exited

from .conftest import VMEnv, kill_leftovers, wait_until
from .test_fork import COUNTER, counting, identity, sh

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]

SUBNETS = {"b": "10.213.8.0/24", "c": "10.213.9.0/24"}


def node_config(env: VMEnv, node: str) -> QemuConfig:
    network = NetworkConfig(
        bridge=f"kt-br{node}",
        subnet=SUBNETS[node],
        netns=env.netns,
        nat=False,
        tap_prefix=f"kt{node}",
        dns=(SUBNETS[node].replace("0/24", "1"),),
    )
    return QemuConfig(
        data_dir=env.data_dir / node,
        network=network,
        boot_timeout=150.0,
        templates=False,
        shared_dir=env.data_dir / "shared",
        node=node,
    )


@contextlib.asynccontextmanager
async def node_engines(env: VMEnv) -> AsyncIterator[dict[str, QemuEngine]]:
    """Nodes b and c's engines, on one shared directory; destroyed after."""
    engines = {node: QemuEngine(node_config(env, node)) for node in ("b", "c")}
    try:
        yield engines
    finally:
        for eng in engines.values():
            for info in eng.list():
                await eng.destroy(info.sandbox_id)
            await eng.close()
        kill_leftovers(f"{env.data_dir}/shared/")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nodes(vm_env: VMEnv) -> AsyncIterator[dict[str, QemuEngine]]:
    async with node_engines(vm_env) as engines:
        yield engines


def spec(sid: str) -> SandboxSpec:
    return SandboxSpec(sandbox_id=sid, name=sid, memory_mb=256)


def in_subnet(ip: str, node: str) -> bool:
    return ip.startswith(SUBNETS[node].rsplit(".", 1)[0] + ".")


async def test_a_cold_sandbox_is_restored_on_another_node_as_it_was(
    nodes: dict[str, QemuEngine],
) -> None:
    b, c = nodes["b"], nodes["c"]
    await b.create(spec("cold"))
    client = await b.agent("cold")
    await client.write_file("/tmp/counter.py", COUNTER.encode())
    await sh(client, "setsid nohup python3 /tmp/counter.py >/dev/null 2>&1 &")
    await sh(client, "echo kept > /home/sandbox/disk.txt")
    token, before = await counting(client)
    agent_token = b.client("cold").token
    old_root = b.paths("cold").root
    await b.stop("cold")
    state = b.export_state("cold")
    assert state["snapshot_valid"] is True
    assert in_subnet(state["record"]["ip"], "b")

    info = await c.adopt(state)  # node b is lost: c takes the sandbox over

    assert in_subnet(info.ip, "c"), info.ip
    assert str(info.thermal) == "hot"
    assert not old_root.exists()
    root = c.paths("cold").root
    assert root.parent == c.config.sandboxes_dir and (root / "rootfs.qcow2").is_file()
    moved = await c.agent("cold")
    assert moved.token == agent_token  # the same credentials reach it
    assert await sh(moved, "cat /home/sandbox/disk.txt") == "kept\n"
    again, n = await counting(moved)  # the same process, counting on
    assert again == token and n > before
    ids = await identity(moved)
    assert ids["hostname"] == "cold"
    assert f" {info.ip}/" in ids["addr"]
    assert ids["mac"] == c.network.mac_for("cold")
    # Its later life is an ordinary one here: stop and start again.
    await c.stop("cold")
    await c.start("cold")
    assert await sh(await c.agent("cold"), "cat /home/sandbox/disk.txt") == "kept\n"
    # Taken once: neither node takes it again.
    with pytest.raises(InvalidState, match="already this node's"):
        await c.adopt(state)
    with pytest.raises(InvalidState, match="already this node's"):
        await c.adopt(c.export_state("cold"))


async def test_a_crashed_sandbox_boots_again_on_another_node_with_its_files(
    nodes: dict[str, QemuEngine],
) -> None:
    b, c = nodes["b"], nodes["c"]
    await b.create(spec("crashed"))
    client = await b.agent("crashed")
    await sh(client, "echo durable > /home/sandbox/disk.txt && sync")
    await client.write_file("/tmp/counter.py", COUNTER.encode())
    await sh(client, "setsid nohup python3 /tmp/counter.py >/dev/null 2>&1 &")
    await counting(client)
    state = b.export_state("crashed")
    pid = b.pid("crashed")
    assert pid is not None
    # Its node is not lost: its machine runs, and QEMU's lock on the disk says so.
    with pytest.raises(InvalidState, match=r"disk is in use .*lock"):
        await c.adopt(state)
    assert b.paths("crashed").root.is_dir()  # nothing moved
    os.kill(pid, signal.SIGKILL)  # the node dies, and its machine with it
    # Gone for good: an exiting process loses its command line before its files
    # (and the disk's lock with them).
    await wait_until(lambda: exited(pid))

    info = await c.adopt(state)

    assert in_subnet(info.ip, "c")
    assert str(info.thermal) == "cold" and not info.has_snapshot
    moved = await c.agent("crashed")  # its next use boots it from its disks
    assert await sh(moved, "cat /home/sandbox/disk.txt") == "durable\n"
    assert await sh(moved, "test -e /tmp/counter || echo gone") == "gone\n"
    ids = await identity(moved)
    assert ids["hostname"] == "crashed" and f" {info.ip}/" in ids["addr"]
    last = c.info("crashed").last_boot
    assert last is not None and last.reason == "rebooted"


async def test_orphan_cleanup_leaves_other_nodes_sandboxes_alone(
    nodes: dict[str, QemuEngine], vm_env: VMEnv
) -> None:
    b, c = nodes["b"], nodes["c"]
    await b.create(spec("live"))
    pid = b.pid("live")
    live_root = b.paths("live").root
    stray = c.config.sandboxes_dir / "sb-stray"
    stray.mkdir()

    removed = await c.cleanup_orphans()

    assert "sandbox dir sb-stray" in removed and not stray.exists()
    assert live_root.is_dir() and (live_root / "sandbox.json").is_file()
    assert pid is not None and pid_alive(pid, b.paths("live").marker)
    assert await sh(await b.agent("live"), "echo up") == "up\n"
    assert (c.paths("cold").root / "sandbox.json").is_file()  # c's own adopted one
    # The shared directory's layout: one directory per node, bases shared.
    shared = vm_env.data_dir / "shared"
    assert sorted(p.name for p in (shared / "nodes").iterdir()) == ["b", "c"]
    assert any((shared / "bases").iterdir())
    assert not (vm_env.data_dir / "b" / "sandboxes").exists()


async def test_adoption_needs_the_shared_directory(vm_env: VMEnv, tmp_path: Path) -> None:
    lone = QemuEngine(
        QemuConfig(
            data_dir=tmp_path / "lone",
            network=NetworkConfig(
                bridge="kt-brl", subnet="10.213.10.0/24", netns=vm_env.netns, nat=False
            ),
        )
    )
    try:
        state = {"engine": "qemu", "record": _record_of(vm_env)}
        with pytest.raises(InvalidState, match="no shared_dir"):
            await lone.adopt(state)
    finally:
        await lone.close()


def _record_of(vm_env: VMEnv) -> dict[str, object]:
    import json  # noqa: PLC0415

    path = vm_env.data_dir / "shared" / "nodes" / "c" / "sandboxes" / "cold" / "sandbox.json"
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data
