"""Fork of a running sandbox (real TCG microVMs): the clone has the source's files,
memory and running processes, its own identity, and both go on independently."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest

from kiln.agent_client import AgentClient, AuthError
from kiln.engine import SandboxSpec, VolumeSpec
from kiln.engine.errors import EngineError, InvalidState, SandboxNotFound
from kiln.engine.qemu import QemuEngine
from kiln.engine.qemu import identity as identity_channel

from .conftest import VMEnv, ip

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
]

#: Counts in memory, with a random token only its memory holds, and writes both out:
#: the same token in a clone proves the process was copied, not restarted.
COUNTER = """\
import secrets, time
token = secrets.token_hex(8)
n = 0
while True:
    n += 1
    with open("/tmp/counter.tmp", "w") as f:
        f.write(f"{token} {n}\\n")
    import os; os.replace("/tmp/counter.tmp", "/tmp/counter")
    time.sleep(0.1)
"""


def spec(sid: str) -> SandboxSpec:
    return SandboxSpec(sandbox_id=sid, name=sid, memory_mb=256, env={"WHO": "source"})


async def sh(client: AgentClient, script: str) -> str:
    result = await client.exec(["sh", "-c", script], timeout=60)
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


async def counter(client: AgentClient) -> tuple[str, int]:
    token, n = (await sh(client, "cat /tmp/counter")).split()
    return token, int(n)


async def counting(client: AgentClient) -> tuple[str, int]:
    """The counter's token and a count, after seeing the count go up."""
    deadline = time.monotonic() + 30
    while not (await sh(client, "cat /tmp/counter 2>/dev/null || true")).strip():
        assert time.monotonic() < deadline, "the counter never started"
        await asyncio.sleep(0.3)
    token, first = await counter(client)
    while True:
        await asyncio.sleep(0.3)
        again, n = await counter(client)
        assert again == token
        if n > first:
            return token, n
        assert time.monotonic() < deadline, "the counter stopped"


async def identity(client: AgentClient) -> dict[str, str]:
    out = await sh(
        client,
        "hostname; cat /sys/class/net/eth0/address; ip -o -4 addr show dev eth0;"
        " head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s.%N",
    )
    hostname, mac, addr, rng, clock = out.strip().splitlines()
    return {"hostname": hostname, "mac": mac, "addr": addr, "rng": rng, "clock": clock}


async def test_a_hot_fork_copies_files_memory_and_processes(engine: QemuEngine) -> None:
    await engine.create(spec("src"))
    src = await engine.agent("src")
    await src.write_file("/tmp/counter.py", COUNTER.encode())
    await sh(src, "setsid nohup python3 /tmp/counter.py >/dev/null 2>&1 &")
    await sh(src, "echo on-disk > /home/sandbox/disk.txt")
    token, before = await counting(src)

    clone_info = await engine.fork("src", spec("clone"))
    pause = engine.last_fork_pause_ms
    assert pause is not None and pause > 0
    clone = await engine.agent("clone")
    assert clone_info.ip != engine.info("src").ip

    # Files (disk and tmpfs), the process and its memory: in both, still running.
    for client in (src, clone):
        assert await sh(client, "cat /home/sandbox/disk.txt") == "on-disk\n"
        assert await sh(client, 'printf %s "$WHO"') == "source"
        again, n = await counting(client)
        assert again == token and n > before

    # Their own identities: hostname, MAC, address, RNG, clock, token.
    ids = {sid: await identity(c) for sid, c in (("src", src), ("clone", clone))}
    assert ids["src"]["hostname"] == "src" and ids["clone"]["hostname"] == "clone"
    assert ids["clone"]["mac"] == engine.network.mac_for("clone") != ids["src"]["mac"]
    assert f" {clone_info.ip}/" in ids["clone"]["addr"]
    assert ids["src"]["rng"] != ids["clone"]["rng"]
    for entry in ids.values():
        assert abs(float(entry["clock"]) - time.time()) < 5
    src_token = engine.client("src").token
    assert engine.client("clone").token != src_token
    stale = AgentClient(engine.client("clone").endpoint, src_token)
    with pytest.raises(AuthError):
        await stale.activity()

    # They diverge.
    await sh(clone, "echo clone-only > /home/sandbox/mine.txt")
    assert await sh(src, "test -e /home/sandbox/mine.txt || echo absent") == "absent\n"
    # The identity went by frame on the clone's TAP, the fast way.
    assert "forked from src (frame;" in console(engine, "clone")
    # Its own config drive is mounted in place of the source's, a little later.
    deadline = time.monotonic() + 30
    while True:
        mounted = await clone.exec(["cat", "/run/kiln/config/config.json"], user="root")
        if mounted.exit_code == 0 and json.loads(mounted.stdout)["sandbox_id"] == "clone":
            break
        assert time.monotonic() < deadline, mounted
        await asyncio.sleep(0.5)


def console(engine: QemuEngine, sid: str) -> str:
    return (engine.config.sandboxes_dir / sid / "console.log").read_text(errors="replace")


async def test_a_failed_copy_leaves_no_clone_and_the_source_running(
    engine: QemuEngine, vm_env: VMEnv
) -> None:
    # The copy fails (the source's root disk is not where its record says; its
    # QEMU, which holds it open, runs on) while the clone's network and config
    # drive are being made beside it: all of that is undone.
    disk = engine.config.sandboxes_dir / "src" / "rootfs.qcow2"
    hidden = disk.with_name("hidden.qcow2")
    disk.rename(hidden)
    try:
        with pytest.raises(EngineError):
            await engine.fork("src", spec("broken"))
    finally:
        hidden.rename(disk)
    assert "broken" not in {info.sandbox_id for info in engine.list()}
    assert not (engine.config.sandboxes_dir / "broken").exists()
    taps = ip("-n", vm_env.netns, "-o", "link", "show").stdout
    assert engine.network.tap_name("broken") not in taps
    await counting(await engine.agent("src"))  # the source went on
    await engine.fork("src", spec("broken"))  # and the name is free again
    await engine.destroy("broken")


async def test_a_clone_deaf_to_frames_learns_by_its_config_drive(
    engine: QemuEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a host gets from an agent that predates identity frames: no answer, so
    # it falls back to the identity block on the config drive.
    monkeypatch.setattr(identity_channel, "_FRAME_PATIENCE", 0.0)
    info = await engine.fork("src", spec("drive-clone"))
    clone = await engine.agent("drive-clone")
    ids = await identity(clone)
    assert ids["hostname"] == "drive-clone"
    assert ids["mac"] == engine.network.mac_for("drive-clone")
    assert f" {info.ip}/" in ids["addr"]
    assert abs(float(ids["clock"]) - time.time()) < 5
    assert "forked from src (config drive;" in console(engine, "drive-clone")
    await counting(clone)
    await engine.destroy("drive-clone")


async def test_a_cold_source_forks_from_its_snapshot(engine: QemuEngine) -> None:
    await engine.stop("src")
    await engine.fork("src", spec("cold-clone"))
    assert engine.last_fork_pause_ms is None
    clone = await engine.agent("cold-clone")
    assert (await sh(clone, "hostname")).strip() == "cold-clone"
    token, _ = await counting(clone)
    src = await engine.agent("src")  # the source restores as ever
    assert (await counting(src))[0] == token
    await engine.destroy("cold-clone")


async def test_destroying_one_leaves_the_other(engine: QemuEngine) -> None:
    # A fork of a fork: the clone is an ordinary sandbox.
    await engine.fork("clone", spec("grandchild"))
    await engine.destroy("clone")
    src = await engine.agent("src")
    await counting(src)
    grandchild = await engine.agent("grandchild")
    assert (await sh(grandchild, "hostname")).strip() == "grandchild"
    await counting(grandchild)
    await engine.destroy("grandchild")


async def test_what_cannot_be_forked(engine: QemuEngine) -> None:
    with pytest.raises(SandboxNotFound):
        await engine.fork("nope", spec("nope-clone"))
    with pytest.raises(InvalidState, match="already exists"):
        await engine.fork("src", spec("src"))
    vol = dataclasses.replace(
        spec("withvol"), volumes=(VolumeSpec(name="forkvol", mount="/mnt/v", size_mb=8),)
    )
    await engine.create(vol)
    with pytest.raises(InvalidState, match="volume"):
        await engine.fork("withvol", spec("vol-clone"))
    await engine.destroy("withvol")
    await engine.delete_volume("forkvol")
