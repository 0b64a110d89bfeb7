"""The Docker engine against the session's private dockerd, with kiln's real rootfs.

Sandboxes are real containers running the real guest agent as PID 1; the
tests talk to it over TCP on the engine's own bridge, as the daemon does. One
runc sandbox (``box``) carries most tests in order; others are made where a
test needs a fresh one (runsc, crashes, recovery).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import signal
import struct
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from kiln.engine import (
    FileSpec,
    InvalidSpec,
    InvalidState,
    SandboxCrashed,
    SandboxNotFound,
    SandboxSpec,
    Status,
    Thermal,
    VolumeSpec,
)
from kiln.engine.docker import Dockerd
from kiln.engine.docker.engine import DockerEngine
from kiln.engine.docker.record import container_name, volume_name
from kiln.engine.docker.testing import engine_config
from kiln.images import builder
from kiln.network import address_mac, tap_name

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

BRIDGE = "kd-eng0"
SUBNET = "10.213.61.0/24"


def base_tree_missing() -> str | None:
    inputs = builder.resolve_inputs("minimal")
    if inputs is None:
        return "no kiln image inputs (run python -m kiln.images ensure)"
    from kiln.images import cache  # noqa: PLC0415

    if not (cache.default_image_dir() / "base" / inputs.base_key / "root").is_dir():
        return "kiln's base rootfs is not built (run python -m kiln.images ensure)"
    return None


def new_spec(name: str, **changes: Any) -> SandboxSpec:
    return SandboxSpec(sandbox_id=f"sb-{secrets.token_hex(4)}", name=name, **changes)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DockerEngine]:
    missing = base_tree_missing()
    if missing:
        pytest.skip(missing)
    state = tmp_path_factory.mktemp("docker-engine")
    eng = DockerEngine(engine_config(state, dockerd, bridge=BRIDGE, subnet=SUBNET))
    try:
        yield eng
    finally:
        for info in eng.list():
            await eng.destroy(info.sandbox_id)
        await eng.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def box(engine: DockerEngine) -> str:
    spec = new_spec(
        "box_one",
        cpus=2,
        memory_mb=256,
        env={"GREETING": "hello"},
        files=(FileSpec("/etc/kiln-test/motd", b"welcome\n", 0o640),),
        init="echo ran >> /tmp/init-runs",
        volumes=(VolumeSpec(f"v-{secrets.token_hex(4)}", "/data", 16),),
    )
    info = await engine.create(spec)
    assert info.engine == "docker" and info.runtime == "runc"
    return spec.sandbox_id


async def ip_link(netns: str | None, *args: str) -> int:
    """``ip -n NETNS link ARGS``: its exit code."""
    argv = ["ip", "-n", netns or "", "link", *args]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, check=False)
    return done.returncode


async def run(engine: DockerEngine, sandbox_id: str, *cmd: str, **kw: Any) -> tuple[int, str]:
    client = await engine.agent(sandbox_id)
    result = await client.exec(list(cmd), **kw)
    return result.exit_code, (result.stdout + result.stderr).decode()


async def test_create_reports_a_hot_running_sandbox(engine: DockerEngine, box: str) -> None:
    info = engine.info(box)
    assert (info.status, info.thermal) == (Status.RUNNING, Thermal.HOT)
    assert info.ip is not None and info.ip.startswith("10.213.61.")
    assert (info.cpus, info.memory_mb, info.name) == (2, 256, "box_one")
    assert not info.capabilities.snapshots and info.capabilities.pause
    assert [i.sandbox_id for i in engine.list()] == [box]


async def test_the_spec_is_applied(engine: DockerEngine, box: str) -> None:
    code, out = await run(
        engine,
        box,
        "sh",
        "-c",
        'echo "$GREETING"; id -un; hostname; stat -c "%a %U" /etc/kiln-test/motd;'
        " cat /etc/kiln-test/motd; cat /tmp/init-runs; stat -c %U /data /workspace; pwd",
    )
    assert code == 0, out
    assert out.split("\n")[:10] == [
        "hello",
        "sandbox",
        "box-one",  # the host name made valid
        "640 sandbox",
        "welcome",
        "ran",
        "sandbox",
        "sandbox",
        "/workspace",
        "",
    ]


async def test_runc_sandboxes_get_their_network_from_kiln(engine: DockerEngine) -> None:
    """--network none, and the engine's veth: up with its address and route before the
    init script runs; /etc/hosts names the sandbox as dockerd's networks do."""
    spec = new_spec("own-net", init="cat /proc/net/route > /tmp/route-at-init")
    info = await engine.create(spec)
    assert info.ip is not None
    attrs = await engine.inspect(spec.sandbox_id)
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    cfg = engine.config.network
    gateway = "{:08X}".format(*struct.unpack("=I", ipaddress.IPv4Address(cfg.gateway).packed))
    code, out = await run(engine, spec.sandbox_id, "sh", "-c", "sleep 0.2; cat /tmp/route-at-init")
    assert code == 0, out
    assert any(line.split()[:3] == ["eth0", "00000000", gateway] for line in out.splitlines())
    code, out = await run(
        engine, spec.sandbox_id, "sh", "-c", "cat /etc/hosts /sys/class/net/eth0/address"
    )
    assert code == 0, out
    assert f"{info.ip}\town-net" in out.splitlines()
    assert out.splitlines()[-1] == address_mac(info.ip)
    await engine.destroy(spec.sandbox_id)
    host_end = tap_name(cfg.tap_prefix, spec.sandbox_id)
    assert await ip_link(cfg.netns, "show", host_end) != 0, "the veth outlived its sandbox"


CGROUP_LIMITS = (
    # cgroup v2, else v1 (these hosts): memory limit, CPU quota and period (µs).
    "if [ -f /sys/fs/cgroup/memory.max ];"
    " then cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max;"
    " else cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us"
    " /sys/fs/cgroup/cpu/cpu.cfs_period_us; fi"
)


async def test_limits_are_the_specs(engine: DockerEngine, box: str) -> None:
    code, out = await run(engine, box, "sh", "-c", CGROUP_LIMITS)
    assert code == 0, out
    memory, quota, period = out.split()
    assert int(memory) == 256 << 20
    assert (int(quota), int(period)) == (200000, 100000)  # 2 CPUs


async def test_root_and_sudo(engine: DockerEngine, box: str) -> None:
    assert await run(engine, box, "id", "-u", user="root") == (0, "0\n")
    code, out = await run(engine, box, "sudo", "-n", "id", "-u")
    assert (code, out) == (0, "0\n")


async def test_forward_reaches_a_server_inside(engine: DockerEngine, box: str) -> None:
    client = await engine.agent(box)
    await client.exec(
        ["sh", "-c", "cd /tmp && nohup python3 -m http.server 8123 >/dev/null 2>&1 &"]
    )
    for _ in range(200):
        try:
            stream = await client.forward(8123)
            break
        except Exception:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the server never listened")
    try:
        await stream.send(b"GET /init-runs HTTP/1.0\r\n\r\n")
        data = await stream.read()
    finally:
        await stream.aclose()
    assert data.startswith(b"HTTP/1.0 200") and data.endswith(b"ran\n")


async def test_pause_and_resume(engine: DockerEngine, box: str) -> None:
    await engine.pause(box)
    assert engine.thermal(box) is Thermal.WARM
    assert (await engine.inspect(box))["State"]["Paused"]
    await engine.resume(box)
    assert engine.thermal(box) is Thermal.HOT
    await engine.pause(box)
    assert await run(engine, box, "echo", "awake") == (0, "awake\n")  # agent() wakes it
    assert engine.thermal(box) is Thermal.HOT


async def test_stop_keeps_files_not_processes(engine: DockerEngine, box: str) -> None:
    client = await engine.agent(box)
    await client.exec(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/sleeper"])
    await client.exec(["sh", "-c", "echo edited > /etc/kiln-test/motd"], user="root")
    info = await engine.stop(box)
    assert (info.status, info.thermal) == (Status.STOPPED, Thermal.COLD)
    with pytest.raises(InvalidState, match="stopped"):
        await engine.pause(box)
    info = await engine.start(box)
    assert (info.status, info.thermal) == (Status.RUNNING, Thermal.HOT)
    code, out = await run(
        engine, box, "sh", "-c", "cat /tmp/init-runs /etc/kiln-test/motd; pgrep sleep || true"
    )
    # The init ran once, the user's edit of a spec file stands, the sleeper is gone.
    assert (code, out) == (0, "ran\nedited\n")


async def test_a_volume_outlives_its_sandbox(engine: DockerEngine) -> None:
    vol = f"v-{secrets.token_hex(4)}"
    first = new_spec("vol-a", volumes=(VolumeSpec(vol, "/data", 8),))
    await engine.create(first)
    assert (await run(engine, first.sandbox_id, "sh", "-c", "echo kept > /data/f"))[0] == 0
    with pytest.raises(InvalidState, match="in use"):
        await engine.delete_volume(vol)
    await engine.destroy(first.sandbox_id)
    second = new_spec("vol-b", volumes=(VolumeSpec(vol, "/mnt/x"),))
    await engine.create(second)
    assert await run(engine, second.sandbox_id, "cat", "/mnt/x/f") == (0, "kept\n")
    await engine.destroy(second.sandbox_id)
    await engine.delete_volume(vol)
    await engine.delete_volume(vol)  # idempotent
    client = await engine.docker_client()
    assert not client.volumes.list(filters={"name": volume_name(vol)})


async def test_runsc_sandbox(engine: DockerEngine) -> None:
    await engine.ready()
    if "runsc" not in engine.runtimes:
        pytest.skip("runsc is not registered in this dockerd")
    spec = new_spec("gvisor", runtime="runsc")
    info = await engine.create(spec)
    assert info.runtime == "runsc" and not info.capabilities.snapshots
    # runsc reads its interfaces when it starts: it stays on dockerd's network.
    attrs = await engine.inspect(spec.sandbox_id)
    assert list(attrs["NetworkSettings"]["Networks"]) == [engine.config.network_name]
    code, out = await run(engine, spec.sandbox_id, "dmesg")
    assert code == 0 and "gVisor" in out  # a user-space kernel, not the host's
    # gVisor (2022) has no pidfd_open: the agent watches its own children on SIGCHLD.
    assert await run(engine, spec.sandbox_id, "id", "-u", user="root") == (0, "0\n")
    assert await run(engine, spec.sandbox_id, "sh", "-c", "exit 7", user="root") == (7, "")
    client = await engine.agent(spec.sandbox_id)
    proc = await client.start_process(["sh", "-c", "sleep 0.2; exit 5"], user="root")
    for _ in range(100):
        if (await client.get_process(proc.pid)).exit_code is not None:
            break
        await asyncio.sleep(0.05)
    assert (await client.get_process(proc.pid)).exit_code == 5
    await engine.pause(spec.sandbox_id)
    assert await run(engine, spec.sandbox_id, "true") == (0, "")
    await engine.destroy(spec.sandbox_id)


async def _kill(engine: DockerEngine, sid: str) -> None:
    attrs = await engine.inspect(sid)
    os.kill(attrs["State"]["Pid"], signal.SIGKILL)
    for _ in range(100):
        if engine.info(sid).thermal is Thermal.COLD:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the death of {sid}'s container went unnoticed")


async def test_a_killed_container_boots_again_on_next_use(engine: DockerEngine) -> None:
    spec = new_spec("crashy")
    sid = spec.sandbox_id
    await engine.create(spec)
    assert await run(engine, sid, "sh", "-c", "echo kept > /workspace/f") == (0, "")
    await _kill(engine, sid)
    info = engine.info(sid)
    assert (info.status, info.has_snapshot, info.problem) == (Status.RUNNING, False, None)
    assert await run(engine, sid, "cat", "/workspace/f") == (0, "kept\n")
    info = engine.info(sid)
    assert (info.status, info.thermal) == (Status.RUNNING, Thermal.HOT)
    assert info.last_boot is not None and info.last_boot.reason == "rebooted"
    # Killed again and its container removed: its files are gone, it is in error.
    await _kill(engine, sid)
    client = await engine.docker_client()
    await asyncio.to_thread(client.api.remove_container, container_name(sid), force=True)
    with pytest.raises(SandboxCrashed, match="is gone"):
        await engine.agent(sid)
    info = engine.info(sid)
    assert (info.status, info.thermal) == (Status.ERROR, Thermal.COLD)
    assert info.problem is not None and "is gone" in info.problem
    with pytest.raises(SandboxCrashed):
        await engine.agent(sid)
    await engine.destroy(sid)


async def test_destroy_frees_everything(engine: DockerEngine) -> None:
    spec = new_spec("gone")
    info = await engine.create(spec)
    directory = engine.config.sandboxes_dir / spec.sandbox_id
    assert directory.is_dir()
    await engine.destroy(spec.sandbox_id)
    await engine.destroy(spec.sandbox_id)  # idempotent
    assert not directory.exists()
    client = await engine.docker_client()
    assert not client.containers.list(all=True, filters={"name": container_name(spec.sandbox_id)})
    with pytest.raises(SandboxNotFound):
        engine.info(spec.sandbox_id)
    again = await engine.create(new_spec("reuse"))  # its address is free again
    assert again.ip == info.ip
    await engine.destroy(again.sandbox_id)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"runtime": "kata"}, "runtime must be one of runc, runsc"),
        ({"engine": "qemu"}, "cannot run a qemu sandbox"),
        ({"cpus": 0}, "cpus"),
        ({"memory_mb": 16}, "memory_mb"),
        ({"env": {"A=B": "x"}}, "environment variable"),
    ],
)
async def test_bad_specs_are_refused_before_anything_runs(
    engine: DockerEngine, changes: dict[str, Any], match: str
) -> None:
    before = engine.list()
    with pytest.raises(InvalidSpec, match=match):
        await engine.create(new_spec("bad", **changes))
    assert engine.list() == before


async def test_unknown_sandbox(engine: DockerEngine) -> None:
    for call in (engine.pause, engine.resume, engine.stop, engine.start, engine.agent):
        with pytest.raises(SandboxNotFound):
            await call("sb-nope")
    with pytest.raises(SandboxNotFound):
        engine.export_state("sb-nope")
    await engine.destroy("sb-nope")  # idempotent


async def test_recovery_re_adopts_running_paused_and_stopped(
    engine: DockerEngine, dockerd: Dockerd
) -> None:
    hot, warm, stopped = (new_spec(n) for n in ("r-hot", "r-warm", "r-stopped"))
    for spec in (hot, warm, stopped):
        await engine.create(spec)
    await engine.pause(warm.sandbox_id)
    await engine.stop(stopped.sandbox_id)
    states = [engine.export_state(s.sandbox_id) for s in (hot, warm, stopped)]
    # The daemon died between a container's start and its plumbing: no veth.
    net = engine.config.network
    assert await ip_link(net.netns, "del", tap_name(net.tap_prefix, hot.sandbox_id)) == 0
    # A new engine over the same state directory: what a restarted daemon does.
    again = DockerEngine(engine.config)
    try:
        infos = [await again.import_state(state) for state in states]
        assert [(i.status, i.thermal) for i in infos] == [
            (Status.RUNNING, Thermal.HOT),
            (Status.RUNNING, Thermal.WARM),
            (Status.STOPPED, Thermal.COLD),
        ]
        assert infos[0].ip == engine.info(hot.sandbox_id).ip
        assert await run(again, hot.sandbox_id, "echo", "still") == (0, "still\n")
        assert await run(again, warm.sandbox_id, "echo", "woke") == (0, "woke\n")
        assert (await again.start(stopped.sandbox_id)).thermal is Thermal.HOT
    finally:
        for spec in (hot, warm, stopped):
            await again.destroy(spec.sandbox_id)
            engine.forget(spec.sandbox_id)
        await again.close()


async def test_recovery_reboots_a_killed_container_and_errs_on_a_removed_one(
    engine: DockerEngine,
) -> None:
    """A host reboot, as the Docker engine sees it: the daemon's state survives, the
    containers' processes do not (one container even vanished with dockerd's data)."""
    killed, removed = (
        new_spec("r-killed", init="echo ran >> /workspace/init-runs"),
        new_spec("r-removed"),
    )
    for spec in (killed, removed):
        await engine.create(spec)
    sid = killed.sandbox_id
    script = "echo kept > /workspace/f; sleep 1000 >/dev/null 2>&1 & echo started"
    assert await run(engine, sid, "sh", "-c", script) == (0, "started\n")
    states = [engine.export_state(s.sandbox_id) for s in (killed, removed)]
    assert states[0]["last_boot"]["reason"] == "created"
    client = await engine.docker_client()
    attrs = await engine.inspect(sid)
    os.kill(attrs["State"]["Pid"], signal.SIGKILL)
    for _ in range(200):
        if not (await engine.inspect(sid))["State"]["Running"]:
            break
        await asyncio.sleep(0.05)
    await asyncio.to_thread(
        client.api.remove_container, container_name(removed.sandbox_id), force=True
    )
    for spec in (killed, removed):
        engine.forget(spec.sandbox_id)  # the daemon crashed with the host
    again = DockerEngine(engine.config)
    try:
        k, r = [await again.import_state(state) for state in states]
        assert (k.status, k.thermal, k.has_snapshot) == (Status.RUNNING, Thermal.COLD, False)
        assert (r.status, r.thermal) == (Status.ERROR, Thermal.COLD)
        assert r.problem is not None and "is gone" in r.problem
        with pytest.raises(SandboxCrashed):
            await again.agent(removed.sandbox_id)
        # Its next use boots it: files kept, processes lost, init not run again.
        code, out = await run(
            again, sid, "sh", "-c", "cat /workspace/f /workspace/init-runs; pgrep sleep || true"
        )
        assert (code, out) == (0, "kept\nran\n")
        info = again.info(sid)
        assert (info.status, info.thermal) == (Status.RUNNING, Thermal.HOT)
        assert info.last_boot is not None and info.last_boot.reason == "rebooted"
        assert info.ip == k.ip
    finally:
        for spec in (killed, removed):
            await again.destroy(spec.sandbox_id)
        await again.close()


async def test_cleanup_orphans_removes_only_its_own_leftovers(engine: DockerEngine) -> None:
    spec = new_spec("orphan")
    await engine.create(spec)
    engine.forget(spec.sandbox_id)  # as if the daemon lost its record of it
    removed = await engine.cleanup_orphans()
    assert f"container {container_name(spec.sandbox_id)}" in removed
    assert f"sandbox dir {spec.sandbox_id}" in removed
    client = await engine.docker_client()
    assert not client.containers.list(all=True, filters={"name": container_name(spec.sandbox_id)})
    assert await engine.cleanup_orphans() == []
