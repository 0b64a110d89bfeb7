"""Sandboxes restored from a template snapshot (real TCG microVMs).

Each must come out as its own machine -- hostname, address, MAC, token, env,
files, init, clock and kernel RNG -- although all of them continue one
snapshot; and anything the template path cannot serve (volumes, a broken
template) must still be created, by booting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kiln.agent_client import AgentClient, AuthError
from kiln.engine import FileSpec, SandboxSpec, VolumeSpec
from kiln.engine.qemu import QemuEngine, templates
from kiln.engine.qemu.accel import Accel
from kiln.engine.qemu.templates import TEMPLATE_FILE

from .conftest import VMEnv
from .guest_scripts import PING

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(vm_env: VMEnv) -> AsyncIterator[QemuEngine]:
    """This module's clones map their template's RAM copy-on-write (off by default)."""
    eng = QemuEngine(vm_env.config(shared_template_ram=True))
    try:
        yield eng
    finally:
        for info in eng.list():
            await eng.destroy(info.sandbox_id)
        await eng.close()


def clone_spec(n: int) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=f"clone{n}",
        name=f"clone_{n}",
        memory_mb=256,
        env={"WHO": f"clone {n}"},
        files=(FileSpec("/etc/clone.txt", f"I am {n}\n".encode(), 0o600),),
        init=f"echo init {n} > /tmp/init.txt",
    )


def template_files(engine: QemuEngine) -> list[dict[str, object]]:
    found = []
    for path in sorted(engine.config.templates_dir.glob(f"*/{TEMPLATE_FILE}")):
        found.append(json.loads(path.read_text()))
    return found


async def sh(client: AgentClient, script: str, user: str | None = None) -> str:
    result = await client.exec(["sh", "-c", script], timeout=60, user=user)
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


async def until_file(client: AgentClient, path: str, timeout: float = 30) -> bytes:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await client.read_file(path)).data
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def test_clones_are_separate_machines(engine: QemuEngine) -> None:
    first = await engine.create(clone_spec(1))
    built = template_files(engine)
    second = await engine.create(clone_spec(2))
    assert len(built) == 1 and template_files(engine) == built  # built once, then reused
    for info in (first, second):
        assert "restore" in engine.last_phases(info.sandbox_id)  # not a boot

    uuids = set()
    for n, info in ((1, first), (2, second)):
        sid = info.sandbox_id
        client = await engine.agent(sid)
        # The template started the agent's worker thread before its snapshot: the
        # first command (whose sync() runs in it) does not have to start one. The
        # third thread waits for a fork's identity (kiln.guest.reidentify).
        assert (await sh(client, "grep ^Threads: /proc/1/status")).split() == ["Threads:", "3"]
        assert (await sh(client, "hostname")).strip() == f"clone-{n}"
        assert await sh(client, 'printf %s "$WHO"') == f"clone {n}"
        assert await sh(client, "id -un") == "sandbox\n"
        file = await client.read_file("/etc/clone.txt")
        assert file.data == f"I am {n}\n".encode() and file.mode == "0600"
        assert await until_file(client, "/tmp/init.txt") == f"init {n}\n".encode()
        link = await sh(client, "cat /sys/class/net/eth0/address")
        assert link.strip() == engine.network.mac_for(sid)
        addresses = await sh(client, "ip -o -4 addr show dev eth0")
        assert f" {info.ip}/" in addresses
        # The template's clock is long gone: the drive and CLOCK_SET made it now.
        guest_time = float(await sh(client, "date +%s.%N"))
        assert abs(guest_time - time.time()) < 5
        # Every clone starts from the template's RNG state; the seed must fork it.
        uuids.add(uuid.UUID((await sh(client, "cat /proc/sys/kernel/random/uuid")).strip()))
    assert len(uuids) == 2

    # Each agent takes only its own sandbox's token.
    other = AgentClient(engine.client("clone1").endpoint, engine.client("clone2").token)
    with pytest.raises(AuthError):
        await other.activity()

    # Their NICs (distinct MACs now) reach each other.
    client = await engine.agent("clone1")
    await client.write_file("/tmp/ping.py", PING.encode())
    assert second.ip is not None
    result = await client.exec(["python3", "/tmp/ping.py", second.ip], user="root", timeout=30)
    assert result.exit_code == 0, result


async def test_clones_inherit_the_spawner_forked_before_the_snapshot(engine: QemuEngine) -> None:
    """The sandbox user's commands start from a spawner (vfork, not a fork of the
    agent) that the template forked before its snapshot: every clone has it at
    the same pid, so no clone pays for that fork. Root's start from PID 1."""
    spawners = set()
    for sid in ("clone1", "clone2"):
        client = await engine.agent(sid)
        parent = (await sh(client, "echo $PPID")).strip()
        assert await sh(client, f"cat /proc/{parent}/comm") == "kiln-spawner\n"
        uids = await sh(client, f"grep ^Uid: /proc/{parent}/status")
        assert uids.split()[1:] == ["1000"] * 4
        assert (await sh(client, "echo $PPID", user="root")).strip() == "1"
        listed = await sh(client, "ps -e -o pid=,comm= | grep -c kiln-spawner")
        assert listed.strip() == "1"
        spawners.add(parent)
    assert len(spawners) == 1


def _ram_mapping(pid: int) -> str:
    """The /proc/PID/maps line of the guest RAM (the one 512 MiB+ file mapping)."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.rstrip().endswith("/ram"):
            return line
    raise AssertionError(f"no RAM file mapping in /proc/{pid}/maps")


async def test_clones_map_the_template_ram_copy_on_write(engine: QemuEngine) -> None:
    """Every clone maps the template's RAM file privately (its unwritten pages are
    shared page cache, not a copy per sandbox) and never writes into it."""
    tpl_ram = next(engine.config.templates_dir.iterdir()) / "ram"
    before = await asyncio.to_thread(hashlib.sha256, tpl_ram.read_bytes())
    for sid in ("clone1", "clone2"):
        pid = engine.pid(sid)
        assert pid is not None
        line = _ram_mapping(pid)
        assert line.split()[1] == "rw-p" and line.endswith(str(tpl_ram)), line  # private
        assert not (engine.paths(sid).root / "ram").exists()  # no copy of its own
    client = await engine.agent("clone1")
    await sh(client, "python3 -c 'b = bytearray(32 << 20); b[::4096] = b\"x\" * (8 << 10)'")
    after = await asyncio.to_thread(hashlib.sha256, tpl_ram.read_bytes())
    assert after.digest() == before.digest()


async def test_guest_aslr_follows_the_accelerator(engine: QemuEngine) -> None:
    """auto: off under TCG (each exec would retranslate ld.so and libc), on under KVM."""
    assert engine.accel is not None
    expected = "2" if engine.accel.accel is Accel.KVM else "0"
    client = await engine.agent("clone1")
    assert (await sh(client, "cat /proc/sys/kernel/randomize_va_space")).strip() == expected


async def test_a_clone_stops_and_restores_like_any_sandbox(engine: QemuEngine) -> None:
    client = await engine.agent("clone1")
    await sh(client, "echo kept > /home/sandbox/kept")
    await engine.stop("clone1")
    last = engine.snapshot_info("clone1").last
    # Its RAM was the template's, copy-on-write: the first stop streams all of it and
    # moves it into a RAM file of the sandbox's own (settles) before the stop returns.
    assert last is not None and last.kind == "full" and last.settle_ms is not None
    assert not last.ram_in_state and last.state_bytes < 1 << 20
    assert (engine.paths("clone1").root / "ram").stat().st_blocks > 0
    await engine.start("clone1")
    client = await engine.agent("clone1")
    assert await sh(client, "cat /home/sandbox/kept /tmp/init.txt") == "kept\ninit 1\n"
    pid = engine.pid("clone1")
    assert pid is not None
    line = _ram_mapping(pid)
    assert line.split()[1] == "rw-s" and line.endswith(str(engine.paths("clone1").root / "ram"))
    await engine.stop("clone1")  # from now on a stop writes only what changed
    last = engine.snapshot_info("clone1").last
    assert last is not None and last.kind == "diff" and last.settle_ms is None
    await engine.start("clone1")
    assert await sh(await engine.agent("clone1"), "cat /home/sandbox/kept") == "kept\n"


async def test_a_fork_of_a_clone_shares_the_template_ram_and_settles(
    engine: QemuEngine,
) -> None:
    """A fork of a clone still mapping its template's RAM gets the same private
    mapping (the RAM streamed over it), and its first stop settles it."""
    await engine.create(clone_spec(5))
    source = await engine.agent("clone5")
    await sh(source, "echo mine > /home/sandbox/five")
    template = engine.snapshot_info("clone5").ram_template
    assert template is not None
    await engine.fork("clone5", dataclasses.replace(clone_spec(6), env={}, files=(), init=None))
    assert engine.snapshot_info("clone6").ram_template == template
    await engine.stop("clone6")
    last = engine.snapshot_info("clone6").last
    assert last is not None and last.settle_ms is not None and not last.ram_in_state
    fork = await engine.agent("clone6")
    assert await sh(fork, "cat /home/sandbox/five; hostname") == "mine\nclone-6\n"
    for sid in ("clone5", "clone6"):
        await engine.destroy(sid)


async def test_a_saved_image_of_a_clone_holds_all_of_its_memory(engine: QemuEngine) -> None:
    """A clone still mapping its template's RAM is saved with its whole memory (in the
    device state): a saved image outlives template rebuilds, so it refers to none."""
    await engine.create(clone_spec(7))
    source = await engine.agent("clone7")
    await sh(source, "echo seven > /home/sandbox/seven; echo in-memory > /tmp/seven")
    assert engine.snapshot_info("clone7").ram_template is not None
    saved = await engine.save_image("clone7", "img-clone7")
    meta = json.loads((engine.config.saved_dir / "img-clone7" / "snapshot.json").read_text())
    assert (meta["ram_template"], meta["ram_in_state"]) == (None, True)
    await engine.create(SandboxSpec(sandbox_id="clone8", name="clone8", **saved.spec_fields()))
    copy = await engine.agent("clone8")
    assert await sh(copy, "cat /home/sandbox/seven /tmp/seven; hostname") == (
        "seven\nin-memory\nclone8\n"
    )
    assert engine.snapshot_info("clone8").ram_template is None
    for sid in ("clone7", "clone8"):
        await engine.destroy(sid)
    await engine.delete_saved_image("img-clone7")


async def test_volumes_take_the_template_disk_slots(engine: QemuEngine) -> None:
    """A new and an existing volume, of sizes the template never saw, in its slots."""
    first = SandboxSpec(
        sandbox_id="vols1",
        name="vols1",
        memory_mb=256,
        volumes=(VolumeSpec(name="tplvol", mount="/mnt/v", size_mb=40),),
    )
    await engine.create(first)
    assert "restore" in engine.last_phases("vols1")
    client = await engine.agent("vols1")
    await sh(client, "echo persisted > /mnt/v/data && sync")
    await engine.destroy("vols1")

    again = SandboxSpec(
        sandbox_id="vols2",
        name="vols2",
        memory_mb=256,
        volumes=(
            VolumeSpec(name="tplvol2", mount="/mnt/w", size_mb=24),
            VolumeSpec(name="tplvol", mount="/mnt/v"),  # existing: keeps its data
        ),
    )
    await engine.create(again)
    assert "restore" in engine.last_phases("vols2")
    client = await engine.agent("vols2")
    assert await sh(client, "cat /mnt/v/data") == "persisted\n"
    sizes = await sh(client, "cat /sys/block/vdc/size /sys/block/vdd/size")
    assert [int(n) * 512 for n in sizes.split()] == [24 << 20, 40 << 20]
    mounts = await sh(client, "cat /proc/mounts")
    assert " /mnt/v ext4 " in mounts and " /mnt/w ext4 " in mounts
    assert await sh(client, "touch /mnt/w/mine && stat -c %U /mnt/w/mine") == "sandbox\n"
    await engine.destroy("vols2")


async def test_more_volumes_than_slots_boot(engine: QemuEngine) -> None:
    count = templates.VOLUME_SLOTS + 1
    spec = SandboxSpec(
        sandbox_id="manyvols",
        name="manyvols",
        memory_mb=256,
        volumes=tuple(VolumeSpec(f"many{i}", f"/mnt/m{i}", 8) for i in range(count)),
    )
    await engine.create(spec)
    assert "boot+agent" in engine.last_phases("manyvols")
    client = await engine.agent("manyvols")
    mounts = await sh(client, "cat /proc/mounts")
    assert all(f" /mnt/m{i} ext4 " in mounts for i in range(count))
    await engine.destroy("manyvols")


async def test_a_broken_template_falls_back_to_a_boot_and_is_rebuilt(engine: QemuEngine) -> None:
    (tpl,) = template_files(engine)
    tpl_dir = next(engine.config.templates_dir.iterdir())
    await asyncio.to_thread((tpl_dir / "state.bin").write_bytes, b"not a QEMU migration stream")
    await engine.create(clone_spec(3))
    assert "boot+agent" in engine.last_phases("clone3")
    assert (await sh(await engine.agent("clone3"), "hostname")).strip() == "clone-3"
    assert template_files(engine) == []  # the broken one is gone...
    await engine.destroy("clone3")

    await engine.create(clone_spec(4))  # ...and the next create builds a new one
    assert "restore" in engine.last_phases("clone4")
    (rebuilt,) = template_files(engine)
    assert rebuilt["key"] == tpl["key"] and rebuilt["created_at"] != tpl["created_at"]
    await engine.destroy("clone4")
