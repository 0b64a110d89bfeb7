"""The QEMU engine on real microVMs (TCG on the dev hosts). No mocks.

Boots are the expensive part (~3 s each on an idle host, 2 cores shared), so
this module boots three VMs and shares them: ``alpha`` (template-free create
with cpus/memory/env/files/init/volumes) carries the exec, TTY, file, session,
thermal and snapshot tests in order; ``beta`` is the second VM for the
cross-VM and IP tests; ``gamma`` reuses beta's address and is then killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from kiln.agent_client import AgentClient, ForwardError, Stdout
from kiln.engine import (
    FileSpec,
    ImageNotFound,
    InvalidSpec,
    InvalidState,
    SandboxCrashed,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
    Status,
    Thermal,
    VolumeSpec,
)
from kiln.engine.qemu import QemuEngine
from kiln.engine.qemu.process import pid_alive
from kiln.engine.qemu.snapshot import cachestat

from .conftest import VMEnv, link_exists, wait_until
from .guest_scripts import ECHO_SERVER, PING

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
]

MIB = 1 << 20
ECHO_PORT = 7777


def make_existing_volume(env: VMEnv, name: str) -> None:
    """A volume the daemon made earlier: an ext4 image with one file in it."""
    vol_dir = env.data_dir / "volumes"
    vol_dir.mkdir(parents=True, exist_ok=True)
    tree = env.data_dir / f"{name}-tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("from an existing volume\n")
    image = vol_dir / f"{name}.ext4"
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "root_owner=1000:1000", "-d", str(tree), str(image)],
        check=True,
    )


ALPHA = SandboxSpec(
    sandbox_id="alpha",
    name="alpha_1",
    cpus=2,
    memory_mb=384,
    env={"KILN_TEST": "hello world", "EMPTY": ""},
    files=(FileSpec("/etc/kiln-test.txt", b"from the config drive\n", 0o640),),
    init="echo init-ran > /tmp/init-marker; exec sleep 100000",
    volumes=(VolumeSpec("fresh", "/mnt/fresh", size_mb=32), VolumeSpec("existing", "/mnt/old")),
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alpha(engine: QemuEngine, vm_env: VMEnv) -> AsyncIterator[SandboxInfo]:
    make_existing_volume(vm_env, "existing")
    info = await engine.create(ALPHA)
    yield info


async def client_of(engine: QemuEngine, sandbox_id: str) -> AgentClient:
    return await engine.agent(sandbox_id)


async def sh(client: AgentClient, script: str, *, user: str | None = None) -> str:
    result = await client.exec(["sh", "-c", script], timeout=60, user=user)
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


# ---------------------------------------------------------------------- create, exec


async def test_create_returns_a_hot_sandbox(
    engine: QemuEngine, alpha: SandboxInfo, vm_env: VMEnv
) -> None:
    assert alpha.sandbox_id == "alpha" and alpha.engine == "qemu"
    assert alpha.status is Status.RUNNING and alpha.thermal is Thermal.HOT
    assert alpha.cpus == 2 and alpha.memory_mb == 384
    assert alpha.ip is not None and alpha.ip.startswith("10.213.7.")
    assert engine.info("alpha") == alpha
    assert [i.sandbox_id for i in engine.list()] == ["alpha"]
    tap = engine.network.tap_name("alpha")
    assert link_exists(vm_env.netns, tap)
    assert engine.pool.owner_of(alpha.ip) == "alpha"
    assert pid_alive(engine.pid("alpha"), engine.paths("alpha").marker)


async def test_template_free_creation_applies_the_whole_spec(engine: QemuEngine) -> None:
    client = await client_of(engine, "alpha")
    assert (await sh(client, "nproc")).strip() == "2"
    mem_kib = int((await sh(client, "grep MemTotal /proc/meminfo")).split()[1])
    assert 300 * 1024 < mem_kib <= 384 * 1024
    assert await sh(client, 'printf %s "$KILN_TEST"') == "hello world"
    assert (await sh(client, "hostname")).strip() == "alpha-1"
    motd = await client.read_file("/etc/kiln-test.txt")
    assert motd.data == b"from the config drive\n" and motd.mode == "0640"
    # The init script runs as TTY session "init".
    await wait_until_file(client, "/tmp/init-marker", b"init-ran\n")
    sessions = await client.list_sessions()
    assert any(s.session_id == "init" and s.running for s in sessions)
    # A new volume, formatted by the engine, writable by the sandbox user.
    await sh(client, "echo fresh-data > /mnt/fresh/f && sync")
    assert await sh(client, "cat /mnt/fresh/f") == "fresh-data\n"
    mounts = await sh(client, "cat /proc/mounts")
    assert " /mnt/fresh ext4 " in mounts and " /mnt/old ext4 " in mounts
    # An existing volume keeps its contents.
    assert await sh(client, "cat /mnt/old/hello.txt") == "from an existing volume\n"


async def wait_until_file(client: AgentClient, path: str, content: bytes) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if (await client.read_file(path)).data == content:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def test_exec_exit_codes_streams_and_stdin(engine: QemuEngine) -> None:
    client = await client_of(engine, "alpha")
    result = await client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert (await client.exec(["cat"], stdin=b"piped")).stdout == b"piped"
    missing = await client.exec(["/no/such/program"])
    assert missing.exit_code == 127
    started = time.perf_counter()
    first_byte: float | None = None
    async with client.exec_stream(["sh", "-c", "echo first; sleep 1; echo second"]) as proc:
        async for event in proc:
            if isinstance(event, Stdout) and first_byte is None:
                first_byte = time.perf_counter() - started
        result = await proc.wait()
    assert result.exit_code == 0
    assert first_byte is not None and first_byte < 0.9  # streamed, not buffered to the end


async def test_shell_with_a_tty(engine: QemuEngine) -> None:
    client = await client_of(engine, "alpha")
    output = b""
    async with client.attach(["/bin/bash", "--norc", "-i"], rows=30, cols=100) as tty:
        assert tty.session_id is not None
        await tty.write(b"stty size; tty; echo done-$((6*7))\n")
        async with asyncio.timeout(20):
            async for chunk in tty:
                output += chunk
                if b"done-42" in output:
                    break
        await tty.write(b"exit\n")
        async with asyncio.timeout(20):
            code = await tty.wait()
    assert b"30 100" in output
    assert b"/dev/pts/" in output
    assert code == 0


async def test_files_through_the_engine(engine: QemuEngine) -> None:
    client = await client_of(engine, "alpha")
    lines = b"".join(b"line %d\n" % i for i in range(1, 10_001))
    await client.write_file("/home/sandbox/ten-thousand.txt", lines, mode=0o600)
    full = await client.read_file("/home/sandbox/ten-thousand.txt")
    assert full.data == lines and not full.truncated and full.mode == "0600"
    part = await client.read_file("/home/sandbox/ten-thousand.txt", offset=5000, limit=2)
    assert part.data == b"line 5000\nline 5001\n"
    assert part.truncated and part.size == len(lines)
    capped = await client.read_file("/home/sandbox/ten-thousand.txt", max_bytes=10)
    assert capped.data == b"line 1\nlin" and capped.truncated
    await client.write_file("/home/sandbox/dir/a.txt", b"")  # parents are created
    stat = await client.stat("/home/sandbox/dir/a.txt")
    assert stat.size == 0 and not stat.is_dir
    listing = await client.ls("/home/sandbox/dir")
    assert [e.name for e in listing.entries] == ["a.txt"]


async def test_sessions_through_the_engine(engine: QemuEngine) -> None:
    client = await client_of(engine, "alpha")
    async with client.attach(["sleep", "100000"]) as tty:
        session_id = tty.session_id
    assert session_id is not None
    listed = {s.session_id: s for s in await client.list_sessions()}
    assert listed[session_id].running and not listed[session_id].attached
    await client.kill_session(session_id)

    async def gone() -> bool:
        # A killed session is either listed as not running or no longer listed.
        after = {s.session_id: s for s in await client.list_sessions()}
        return session_id not in after or not after[session_id].running

    deadline = time.monotonic() + 10
    while not await gone():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_activity(engine: QemuEngine) -> None:
    client = await client_of(engine, "alpha")
    before = time.time()
    await client.exec(["true"])
    activity = await client.activity()
    assert activity.last_activity_unix >= before - 5
    assert activity.running_sessions >= 1  # init


# ---------------------------------------------------------------------- thermal


async def assert_guest_clock_is_current(client: AgentClient, slack: float = 0.5) -> None:
    """The guest's wall clock reads a time between our before and after (± slack).

    Callers first keep the guest stopped for longer than ``slack``, so a clock
    that was not set after the wake-up fails this.
    """
    host_before = time.time()
    guest = float(await sh(client, "date +%s.%N"))
    host_after = time.time()
    assert host_before - slack <= guest <= host_after + slack, (host_before, guest, host_after)


async def test_pause_and_resume(engine: QemuEngine) -> None:
    client = await client_of(engine, "alpha")
    await engine.pause("alpha")
    assert engine.thermal("alpha") is Thermal.WARM
    await engine.pause("alpha")  # idempotent
    # A paused guest does not answer (its vCPUs are stopped) ...
    with pytest.raises(Exception):  # noqa: B017 -- AgentTimeout or a connect timeout
        await asyncio.wait_for(client.exec(["true"]), 1.0)
    await asyncio.sleep(1.5)
    await engine.resume("alpha")
    assert engine.thermal("alpha") is Thermal.HOT
    # ... and after resume its clock was set (agent() waits for that): no drift
    # from the time it was paused.
    client = await client_of(engine, "alpha")
    await assert_guest_clock_is_current(client)
    assert (await client.exec(["true"])).exit_code == 0


async def test_ensure_hot_from_warm(engine: QemuEngine) -> None:
    await engine.pause("alpha")
    await engine.ensure_hot("alpha")
    assert engine.thermal("alpha") is Thermal.HOT
    client = await client_of(engine, "alpha")
    assert (await client.exec(["true"])).exit_code == 0


async def start_echo_server(client: AgentClient) -> str:
    """Start the echo server in a detached TTY session; return its banner."""
    await client.write_file("/tmp/echo.py", ECHO_SERVER.encode())
    async with client.attach(["python3", "/tmp/echo.py", str(ECHO_PORT)]):
        pass
    deadline = time.monotonic() + 30
    while True:
        try:
            stream = await client.forward(ECHO_PORT)
        except ForwardError:
            assert time.monotonic() < deadline, "echo server did not come up"
            await asyncio.sleep(0.2)
            continue
        try:
            return (await stream.readexactly(len("TOKEN ") + 17)).decode()
        finally:
            await stream.aclose()


async def echo_through_tunnel(engine: QemuEngine) -> str:
    stream = await engine.tunnel("alpha", ECHO_PORT)
    try:
        banner = (await stream.readexactly(len("TOKEN ") + 17)).decode()
        stream.write(b"ping over the tunnel")
        await stream.drain()
        assert await stream.readexactly(20) == b"ping over the tunnel"
        return banner
    finally:
        await stream.aclose()


def ram_cached_bytes(engine: QemuEngine) -> int:
    fd = os.open(engine.paths("alpha").ram, os.O_RDONLY)
    try:
        stat = cachestat(fd)
    finally:
        os.close(fd)
    return 0 if stat is None else stat[0]


async def test_stop_start_full_then_diff_then_diff(engine: QemuEngine) -> None:
    """Data written between snapshots accumulates; processes and /tmp survive."""
    client = await client_of(engine, "alpha")
    banner = await start_echo_server(client)
    assert ECHO_PORT in await engine.listening_ports("alpha")
    assert not {1024, 1025} & set(await engine.listening_ports("alpha"))
    kinds = []
    for generation in (1, 2, 3):
        await sh(client, f"echo gen{generation} > /home/sandbox/gen{generation}")
        await sh(client, f"echo tmp{generation} > /tmp/tmp{generation}")
        qemu_pid = engine.pid("alpha")
        info = await engine.stop("alpha")
        assert info.thermal is Thermal.COLD and info.has_snapshot
        assert info.status is Status.RUNNING
        assert not pid_alive(qemu_pid, engine.paths("alpha").marker)  # QEMU is gone
        assert ram_cached_bytes(engine) < 8 * MIB  # and its RAM left the page cache
        meta = engine.snapshot_info("alpha")
        assert meta.valid and meta.last is not None
        assert meta.last.generation == generation
        assert meta.last.state_bytes < MIB  # device state only: RAM stays in its file
        kinds.append(meta.last.kind)
        print(f"\nsnapshot {generation}: {meta.last}")
        info = await engine.start("alpha")
        assert info.thermal is Thermal.HOT and not info.has_snapshot  # a restore spends it
        client = await client_of(engine, "alpha")
        for g in range(1, generation + 1):
            assert await sh(client, f"cat /home/sandbox/gen{g} /tmp/tmp{g}") == f"gen{g}\ntmp{g}\n"
    assert kinds == ["full", "diff", "diff"]
    # The init session and the echo server (its memory included) lived through it all.
    assert any(s.session_id == "init" and s.running for s in await client.list_sessions())
    assert await echo_through_tunnel(engine) == banner


async def test_ensure_hot_from_cold_and_network_after_restore(engine: QemuEngine) -> None:
    client = await client_of(engine, "alpha")
    banner = await echo_through_tunnel(engine)
    await engine.stop("alpha")
    assert engine.thermal("alpha") is Thermal.COLD
    await engine.stop("alpha")  # idempotent
    with pytest.raises(InvalidState):
        await engine.resume("alpha")  # resume is warm → hot only
    await asyncio.sleep(1.5)  # cold for a while: the guest clock falls behind
    await engine.ensure_hot("alpha")
    assert engine.thermal("alpha") is Thermal.HOT
    await assert_guest_clock_is_current(client)
    # Host → guest: a listener in the guest is reachable through the forward channel.
    assert await echo_through_tunnel(engine) == banner


async def test_agent_wakes_a_cold_sandbox(engine: QemuEngine) -> None:
    await engine.stop("alpha")
    client = await engine.agent("alpha")
    assert engine.thermal("alpha") is Thermal.HOT
    assert (await client.exec(["cat", "/home/sandbox/gen1"])).stdout == b"gen1\n"


async def test_snapshot_falls_back_to_full_when_the_ram_file_is_missing(
    engine: QemuEngine,
) -> None:
    client = await client_of(engine, "alpha")
    await sh(client, "echo before-fallback > /tmp/fallback")
    engine.paths("alpha").ram.unlink()  # the base of the diff is gone
    await engine.stop("alpha")
    meta = engine.snapshot_info("alpha")
    assert meta.valid and meta.last is not None
    assert meta.last.ram_in_state and meta.last.kind == "full"
    assert meta.last.state_bytes > 10 * MIB  # the guest's RAM went into the stream
    await engine.start("alpha")
    client = await client_of(engine, "alpha")
    assert await sh(client, "cat /tmp/fallback /home/sandbox/gen3") == "before-fallback\ngen3\n"
    # Back to the RAM-file scheme: the next stop saves device state only.
    await engine.stop("alpha")
    last = engine.snapshot_info("alpha").last
    assert last is not None and not last.ram_in_state and last.state_bytes < MIB
    await engine.start("alpha")
    assert await sh(client, "cat /tmp/fallback") == "before-fallback\n"


async def test_a_consumed_snapshot_is_not_restored_twice(engine: QemuEngine) -> None:
    assert engine.thermal("alpha") is Thermal.HOT
    assert not engine.snapshot_info("alpha").valid
    await engine.start("alpha")  # hot: nothing to do
    assert engine.thermal("alpha") is Thermal.HOT


async def test_observers_during_a_stop_never_see_a_crash(engine: QemuEngine) -> None:
    """info/thermal/list/export_state while a snapshot is half done (pid already
    cleared, not yet cold) must not mistake it for a dead QEMU."""
    seen: list[Status] = []
    stop = asyncio.create_task(engine.stop("alpha"))
    while not stop.done():
        seen.append(engine.info("alpha").status)
        engine.thermal("alpha")
        engine.list()
        engine.export_state("alpha")
        await asyncio.sleep(0)
    await stop
    assert seen and set(seen) == {Status.RUNNING}
    assert engine.info("alpha").status is Status.RUNNING
    await engine.start("alpha")
    assert engine.thermal("alpha") is Thermal.HOT


# ---------------------------------------------------------------------- network


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def beta(engine: QemuEngine, alpha: SandboxInfo) -> SandboxInfo:
    return await engine.create(SandboxSpec(sandbox_id="beta", name="beta", memory_mb=256))


async def test_two_vms_ping_each_other(
    engine: QemuEngine, alpha: SandboxInfo, beta: SandboxInfo
) -> None:
    assert alpha.ip != beta.ip
    for src, dst in (("alpha", beta.ip), ("beta", alpha.ip)):
        client = await client_of(engine, src)
        await client.write_file("/tmp/ping.py", PING.encode())
        assert dst is not None
        result = await client.exec(["python3", "/tmp/ping.py", dst], user="root", timeout=30)
        assert result.exit_code == 0, result
        assert f"reply from {dst}".encode() in result.stdout


async def test_the_sandbox_network_is_ipv4_only(engine: QemuEngine, alpha: SandboxInfo) -> None:
    client = await client_of(engine, "alpha")
    flags = await sh(
        client,
        "cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6 /proc/sys/net/ipv6/conf/lo/disable_ipv6",
    )
    assert flags.split() == ["1", "0"]  # eth0 without IPv6, loopback keeps ::1
    probe = "import socket; s = socket.socket(socket.AF_INET6); s.bind(('::1', 0)); print('ok')"
    assert (await sh(client, f'python3 -c "{probe}"')).strip() == "ok"


async def test_bridge_setup_is_idempotent(engine: QemuEngine, vm_env: VMEnv) -> None:
    await asyncio.to_thread(engine.network.setup)
    await asyncio.to_thread(engine.network.setup)
    assert link_exists(vm_env.netns, vm_env.bridge)
    client = await client_of(engine, "beta")
    assert (await client.exec(["true"])).exit_code == 0  # TAPs stay attached


async def test_ip_allocation_release_and_reuse(
    engine: QemuEngine, beta: SandboxInfo, vm_env: VMEnv
) -> None:
    assert engine.info("alpha").ip == "10.213.7.2"
    assert beta.ip == "10.213.7.3"
    tap = engine.network.tap_name("beta")
    beta_dir = engine.paths("beta").root
    await engine.destroy("beta")
    assert not link_exists(vm_env.netns, tap)
    assert engine.pool.owner_of("10.213.7.3") is None
    assert not beta_dir.exists()
    with pytest.raises(SandboxNotFound):
        engine.info("beta")
    await engine.destroy("beta")  # idempotent
    gamma = await engine.create(SandboxSpec(sandbox_id="gamma", name="gamma", memory_mb=256))
    assert gamma.ip == "10.213.7.3"  # the lowest free address, reused


async def test_a_killed_qemu_boots_again_and_destroy_still_cleans_up(
    engine: QemuEngine, vm_env: VMEnv
) -> None:
    pid = engine.pid("gamma")
    assert pid is not None
    paths = engine.paths("gamma")
    tap = engine.network.tap_name("gamma")
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: engine.info("gamma").thermal is Thermal.COLD)
    info = engine.info("gamma")
    assert (info.status, info.has_snapshot, engine.pid("gamma")) == (Status.RUNNING, False, None)
    client = await engine.agent("gamma")  # booted again from its disks
    assert (await client.exec(["true"])).exit_code == 0
    info = engine.info("gamma")
    assert info.last_boot is not None and info.last_boot.reason == "rebooted"
    assert engine.pid("gamma") not in (None, pid)
    # Killed again, now with its disk gone: in error, only destroy is left. (The disk
    # goes first: a death noticed in between would rightly leave it to reboot.)
    rootfs = engine.export_state("gamma")["record"]["drives"][0]["path"]
    os.unlink(rootfs)
    os.kill(engine.pid("gamma") or 0, signal.SIGKILL)
    await wait_until(lambda: engine.info("gamma").status is Status.ERROR)
    assert engine.info("gamma").problem == f"its disk {rootfs} is missing"
    with pytest.raises(SandboxCrashed):
        await engine.agent("gamma")
    with pytest.raises(SandboxCrashed):
        await engine.stop("gamma")
    await engine.destroy("gamma")
    assert not link_exists(vm_env.netns, tap)
    assert engine.pool.owner_of("10.213.7.3") is None
    assert not paths.root.exists()
    assert [i.sandbox_id for i in engine.list()] == ["alpha"]


# ---------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (SandboxSpec("bad1", "bad1", cpus=0), InvalidSpec, "cpus"),
        (SandboxSpec("bad2", "bad2", memory_mb=1), InvalidSpec, "memory_mb"),
        (SandboxSpec("bad3", "bad3", image="no-such-tier"), ImageNotFound, "no-such-tier"),
        (SandboxSpec("bad4", "bad4", volumes=(VolumeSpec("../x", "/x"),)), InvalidSpec, "volume"),
        (SandboxSpec("bad5", "bad5", volumes=(VolumeSpec("nope", "/x"),)), InvalidSpec, "exist"),
        (SandboxSpec("bad6", "-bad"), InvalidSpec, "name"),
        (SandboxSpec("../bad7", "bad7"), InvalidSpec, "id"),
        (SandboxSpec("alpha", "dup"), InvalidState, "exists"),
        (
            SandboxSpec("bad8", "bad8", volumes=(VolumeSpec("existing", "/x", size_mb=8),)),
            InvalidSpec,
            "already exists",
        ),
    ],
)
async def test_bad_specs_are_rejected_before_anything_starts(
    engine: QemuEngine,
    alpha: SandboxInfo,
    spec: SandboxSpec,
    error: type[Exception],
    message: str,
) -> None:
    dirs_before = sorted(p.name for p in engine.config.sandboxes_dir.iterdir())
    taps_before = await asyncio.to_thread(engine.network.list_taps)
    used_before = engine.pool.in_use()
    with pytest.raises(error, match=message):
        await engine.create(spec)
    assert sorted(p.name for p in engine.config.sandboxes_dir.iterdir()) == dirs_before
    assert await asyncio.to_thread(engine.network.list_taps) == taps_before
    assert engine.pool.in_use() == used_before


async def test_a_volume_in_use_is_refused(engine: QemuEngine) -> None:
    with pytest.raises(InvalidState, match="attached"):
        await engine.create(SandboxSpec("bad9", "bad9", volumes=(VolumeSpec("existing", "/x"),)))


# ---------------------------------------------------------------------- destroy


async def test_destroy_a_cold_sandbox(engine: QemuEngine, vm_env: VMEnv) -> None:
    await engine.stop("alpha")
    paths = engine.paths("alpha")
    tap = engine.network.tap_name("alpha")
    await engine.destroy("alpha")
    assert not paths.root.exists()
    assert not link_exists(vm_env.netns, tap)
    assert engine.pool.in_use() == {}
    assert engine.list() == []
    # Volumes outlive sandboxes.
    assert (engine.config.effective_volumes_dir / "fresh.ext4").exists()
    assert (engine.config.effective_volumes_dir / "existing.ext4").exists()
