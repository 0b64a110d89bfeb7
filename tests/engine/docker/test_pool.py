"""The Docker engine's warm pool against the session's private dockerd, with kiln's real
rootfs, the real guest agent and a real firewall (nftables in dockerd's namespace).

One engine (``pool_size`` 1) serves the module; each test waits for its member
to be ready, claims it and checks the sandbox it became from inside and from
the host: the spec applied (env, files, host name, token, init), nothing of an
earlier user left, the member gone from every view, the refill, the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from kiln.agent_client import AgentError
from kiln.engine import FileSpec, SandboxSpec, Status, Thermal, VolumeSpec
from kiln.engine.docker import Dockerd
from kiln.engine.docker.engine import DockerEngine
from kiln.engine.docker.pool import LOW_CPU_SHARES, MEMBER_PREFIX, NORMAL_CPU_SHARES
from kiln.engine.docker.record import LABEL, Record, container_name
from kiln.engine.docker.testing import engine_config
from kiln.network import tap_name
from kiln.network.firewall import Firewall, FirewallConfig, Member
from kiln.network.policy import NetworkPolicy

from .test_engine import base_tree_missing

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

BRIDGE = "kd-pool0"
SUBNET = "10.213.72.0/24"
TABLE = "kiln_dpool"
SHAPE: dict[str, Any] = {"cpus": 1, "memory_mb": 256}
READY_WAIT = 60.0


def new_spec(name: str, owner: str = "alice", **changes: Any) -> SandboxSpec:
    fields = {**SHAPE, **changes}
    return SandboxSpec(
        sandbox_id=f"sb-{secrets.token_hex(4)}", name=name, owner=owner, engine="docker", **fields
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def firewall(dockerd: Dockerd) -> Firewall:
    netns = dockerd.config.netns
    assert netns is not None
    fw = Firewall(FirewallConfig(table=TABLE, bridges=(BRIDGE,), netns=netns, dns=()))
    await asyncio.to_thread(fw.setup)
    return fw


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    dockerd: Dockerd, firewall: Firewall, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DockerEngine]:
    missing = base_tree_missing()
    if missing:
        pytest.skip(missing)
    state = tmp_path_factory.mktemp("docker-pool")
    config = engine_config(state, dockerd, bridge=BRIDGE, subnet=SUBNET)
    config = _with_pool(config, size=1)
    eng = DockerEngine(config, firewall)
    try:
        await eng.prepare(new_spec("warm-up"))
        yield eng
    finally:
        for info in eng.list():
            await eng.destroy(info.sandbox_id)
        await eng.close()


def _with_pool(config: Any, size: int, memory_mb: int = 2048) -> Any:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(config, pool_size=size, pool_memory_mb=memory_mb)


async def wait_ready(engine: DockerEngine, spec: SandboxSpec, count: int = 1) -> None:
    deadline = time.monotonic() + READY_WAIT
    while engine.warm_pool.ready(spec, spec.runtime or "runc") < count:
        assert time.monotonic() < deadline, "the pool did not fill"
        await asyncio.sleep(0.05)


async def run(engine: DockerEngine, sandbox_id: str, script: str) -> str:
    client = await engine.agent(sandbox_id)
    result = await client.exec(["sh", "-c", script])
    out = (result.stdout + result.stderr).decode()
    assert result.exit_code == 0, out
    return out


def record_of(engine: DockerEngine, sandbox_id: str) -> Record:
    return Record.load(engine.config.sandboxes_dir / sandbox_id)


async def claimed(engine: DockerEngine, spec: SandboxSpec) -> str:
    """Create ``spec`` from a ready member; the member's id."""
    await wait_ready(engine, spec)
    before = engine.warm_pool.claims
    info = await engine.create(spec)
    assert engine.warm_pool.claims == before + 1, "the create did not take the member"
    assert (info.status, info.thermal) == (Status.RUNNING, Thermal.HOT)
    member = record_of(engine, spec.sandbox_id).member
    assert member is not None and member.startswith(MEMBER_PREFIX)
    return member


RANDOM = "head -c 16 /dev/urandom | od -An -tx1"
#: The container's own cgroup weight, as it sees it (cgroup v1: these hosts).
CPU_SHARES = "cat /sys/fs/cgroup/cpu/cpu.shares"
USER_SCRIPT = (
    'echo "env=$SECRET"; echo "host=$(hostname)"; echo "file=$(cat /etc/hostname)";'
    " grep -c user-one /etc/hosts || true; ls /home/sandbox/secret.txt 2>&1 || true;"
    " cat /tmp/init-ran 2>&1 || true; id -un"
)


async def test_a_claim_applies_the_spec_and_hides_the_member(
    engine: DockerEngine, firewall: Firewall
) -> None:
    spec = new_spec(
        "user_one",
        env={"SECRET": "one"},
        files=(FileSpec("/home/sandbox/secret.txt", b"first user\n", 0o600),),
        init="echo yes > /tmp/init-ran",
        network=NetworkPolicy("deny", allow=("192.0.2.1/32",)),
    )
    member = await claimed(engine, spec)
    sid = spec.sandbox_id
    await asyncio.sleep(0.2)  # the init script runs in the background
    out = await run(engine, sid, USER_SCRIPT + "; stat -c '%a %U' /home/sandbox/secret.txt")
    assert out.splitlines() == [
        "env=one",
        "host=user-one",  # set from outside the container: see kiln.engine.docker.hostname
        "file=user-one",
        "1",  # /etc/hosts names the sandbox at its address
        "/home/sandbox/secret.txt",
        "yes",
        "sandbox",
        "600 sandbox",
    ]
    # Docker's view: the sandbox's name; the member is in no listing. Its CPU weight
    # is a sandbox's in its cgroup (Docker's config keeps the member's until a restart).
    attrs = await engine.inspect(sid)
    assert attrs["Name"] == f"/{container_name(sid)}"
    assert int(await run(engine, sid, CPU_SHARES)) == NORMAL_CPU_SHARES
    assert attrs["Config"]["Labels"][LABEL] == member  # fixed at create: the record says so
    assert [i.sandbox_id for i in engine.list()] == [sid]
    assert not any(b.sandbox_id == member for b in engine.warm_pool.members())
    # The firewall holds the sandbox as an ordinary create would: its owner's group,
    # its policy, its address; the member's rules are gone.
    info = engine.info(sid)
    assert info.ip is not None
    assert firewall.members()[sid] == Member(sid, info.ip, "alice", spec.network)
    assert member not in firewall.members()
    assert engine.pool.in_use()[info.ip] == sid
    await engine.destroy(sid)


async def test_nothing_of_one_user_reaches_the_next(engine: DockerEngine) -> None:
    first = new_spec(
        "user_one",
        env={"SECRET": "one"},
        files=(FileSpec("/home/sandbox/secret.txt", b"first user\n", 0o600),),
        init="echo yes > /tmp/init-ran",
    )
    first_member = await claimed(engine, first)
    old_client = engine.client(first.sandbox_id)
    first_random = await run(engine, first.sandbox_id, RANDOM)
    await engine.destroy(first.sandbox_id)
    second = new_spec("user_two", owner="bob")
    second_member = await claimed(engine, second)
    assert second_member != first_member, "members are never reused"
    out = await run(engine, second.sandbox_id, USER_SCRIPT)
    assert out.splitlines()[:4] == ["env=", "host=user-two", "file=user-two", "0"]
    assert "No such file" in out.splitlines()[4] and "No such file" in out.splitlines()[5]
    # Clock and RNG are the host kernel's: right, and not a copy of anyone's.
    out = await run(engine, second.sandbox_id, "date +%s")
    assert abs(int(out) - time.time()) < 5
    second_random = await run(engine, second.sandbox_id, RANDOM)
    assert len(second_random.split()) == 16 and second_random != first_random
    # The first user's token is dead; the member's token (what the first user's was
    # made from: nothing) opens nothing either.
    info = engine.info(second.sandbox_id)
    assert info.ip is not None
    with pytest.raises(AgentError):
        await _client_at(engine, info.ip, old_client.token).exec(["true"])
    assert record_of(engine, second.sandbox_id).token != old_client.token
    await engine.destroy(second.sandbox_id)


def _client_at(engine: DockerEngine, ip: str, token: str) -> Any:
    import dataclasses  # noqa: PLC0415

    record = record_of_any(engine)
    return engine._client_for(dataclasses.replace(record, ip=ip, token=token))


def record_of_any(engine: DockerEngine) -> Record:
    for entry in engine.config.sandboxes_dir.iterdir():
        with contextlib.suppress(OSError, ValueError):
            return Record.load(entry)
    raise AssertionError("no record")


async def test_the_pool_refills_and_falls_back_when_empty(engine: DockerEngine) -> None:
    one = new_spec("one")
    await claimed(engine, one)
    # Taken, not refilled yet (a refill waits until creates settle): the next create
    # of the shape takes the ordinary path.
    assert engine.warm_pool.ready(one, "runc") == 0
    misses = engine.warm_pool.misses
    two = new_spec("two")
    await engine.create(two)
    assert engine.warm_pool.misses == misses + 1
    assert record_of(engine, two.sandbox_id).member is None
    # Specs the pool cannot serve never take a member.
    await wait_ready(engine, one)
    for other in (
        new_spec("bigger", memory_mb=384),
        new_spec("with-volume", volumes=(VolumeSpec(f"v-{secrets.token_hex(4)}", "/data", 16),)),
        new_spec("own-user", user="alice"),
    ):
        assert not engine.warm_pool.fits(other, "runc")
    assert not engine.warm_pool.fits(one, "runsc")  # no member of that shape is kept
    # The refilled member: paused, at low CPU weight, in no listing.
    (member,) = engine.warm_pool.members()
    client = await engine.docker_client()
    attrs = await asyncio.to_thread(client.api.inspect_container, member.record.container)
    assert attrs["State"]["Paused"] is True
    assert attrs["HostConfig"]["CpuShares"] == LOW_CPU_SHARES
    assert member.sandbox_id not in {i.sandbox_id for i in engine.list()}
    # Orphan cleanup knows members and sandboxes made from them.
    assert await engine.cleanup_orphans() == []
    for spec in (one, two):
        await engine.destroy(spec.sandbox_id)


async def test_a_claimed_sandbox_stops_starts_and_is_destroyed_like_any(
    engine: DockerEngine,
) -> None:
    spec = new_spec("rebooted", env={"SECRET": "kept"})
    member = await claimed(engine, spec)
    sid = spec.sandbox_id
    await engine.pause(sid)
    await engine.resume(sid)
    await engine.stop(sid)
    await engine.start(sid)
    # Docker starts it under the member's host name: the engine renames it again, and
    # the agent reads the sandbox's config (token, env) from the member's directory.
    out = await run(engine, sid, 'echo "$SECRET $(hostname) $(cat /etc/hostname)"')
    assert out.split() == ["kept", "rebooted", "rebooted"]
    assert int(await run(engine, sid, CPU_SHARES)) == NORMAL_CPU_SHARES
    attrs = await engine.inspect(sid)
    assert attrs["HostConfig"]["CpuShares"] == NORMAL_CPU_SHARES
    cfg = engine.config
    await engine.destroy(sid)
    client = await engine.docker_client()
    assert not client.containers.list(all=True, filters={"name": container_name(sid)})
    assert not client.containers.list(all=True, filters={"label": f"{LABEL}={member}"})
    assert not (cfg.sandboxes_dir / sid).exists()
    assert not (cfg.sandboxes_dir / member).exists()
    for owner in (sid, member):
        link = tap_name(cfg.network.tap_prefix, owner)
        argv = ["ip", "-n", cfg.network.netns or "", "link", "show", link]
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, check=False)
        assert done.returncode != 0, f"veth {link} outlived the sandbox"


async def test_a_claimed_sandbox_saves_and_a_create_from_its_image_is_no_claim(
    engine: DockerEngine,
) -> None:
    spec = new_spec("saver", env={"SECRET": "saved"})
    await claimed(engine, spec)
    await run(engine, spec.sandbox_id, "echo kept > /workspace/kept.txt")
    image_id = f"img-{secrets.token_hex(3)}"
    await engine.save_image(spec.sandbox_id, image_id)
    try:
        await wait_ready(engine, spec)
        again = new_spec("from-saved", snapshot=image_id)
        assert not engine.warm_pool.fits(again, "runc")
        claims = engine.warm_pool.claims
        await engine.create(again)
        assert engine.warm_pool.claims == claims, "a saved image's create took a member"
        assert record_of(engine, again.sandbox_id).member is None
        out = await run(engine, again.sandbox_id, 'cat /workspace/kept.txt; echo "[$SECRET]"')
        assert out.split() == ["kept", "[]"]  # the files, not the first user's env
        assert engine.warm_pool.ready(spec, "runc") == 1
        await engine.destroy(again.sandbox_id)
    finally:
        await engine.destroy(spec.sandbox_id)
        await engine.delete_saved_image(image_id)


async def test_recovery_and_orphan_cleanup_know_a_claimed_sandbox(
    engine: DockerEngine, firewall: Firewall
) -> None:
    spec = new_spec("recovered")
    member = await claimed(engine, spec)
    sid = spec.sandbox_id
    state = engine.export_state(sid)
    again = DockerEngine(_with_pool(engine.config, size=0), firewall)
    try:
        info = await again.import_state(state)
        assert info.status is Status.RUNNING
        # Another engine instance on the same state (as after a daemon restart): the
        # pool's live member is unknown to it and removed; the claimed sandbox is kept.
        removed = await again.cleanup_orphans()
        assert f"container {container_name(sid)}" not in removed
        assert f"sandbox dir {member}" not in removed
        assert all(MEMBER_PREFIX in r for r in removed), removed
        out = await run(again, sid, "hostname")
        assert out.strip() == "recovered"
        await again.destroy(sid)
    finally:
        await again.close()
        engine.forget(sid)


async def test_a_member_that_died_is_dropped_and_the_create_goes_on(
    engine: DockerEngine,
) -> None:
    spec = new_spec("after-death")
    await wait_ready(engine, spec)
    (member,) = engine.warm_pool.members()
    client = await engine.docker_client()
    await asyncio.to_thread(client.api.remove_container, member.record.container, force=True)
    info = await engine.create(spec)
    assert info.status is Status.RUNNING
    assert record_of(engine, spec.sandbox_id).member is None
    assert not (engine.config.sandboxes_dir / member.sandbox_id).exists()
    await run(engine, spec.sandbox_id, "true")
    await engine.destroy(spec.sandbox_id)


async def test_a_shape_that_cannot_be_made_does_not_starve_the_others(
    dockerd: Dockerd, tmp_path: Path
) -> None:
    if base_tree_missing():
        pytest.skip(str(base_tree_missing()))
    config = engine_config(tmp_path, dockerd, bridge="kd-pool2", subnet="10.213.70.0/24")
    eng = DockerEngine(_with_pool(config, size=1))
    good = new_spec("good")
    impossible = new_spec("impossible", cpus=64)  # more CPUs than dockerd lets it have
    try:
        await eng.prepare(good)
        eng.warm_pool.start(impossible, "runc")
        await wait_ready(eng, good)
        await eng.create(good)
        assert eng.warm_pool.claims == 1
        await wait_ready(eng, good)  # refilled while the other shape keeps failing
        assert eng.warm_pool.ready(impossible, "runc") == 0
        await eng.destroy(good.sandbox_id)
    finally:
        await eng.close()


async def test_close_removes_the_members(
    dockerd: Dockerd, firewall: Firewall, tmp_path: Path
) -> None:
    if base_tree_missing():
        pytest.skip(str(base_tree_missing()))
    config = engine_config(tmp_path, dockerd, bridge="kd-pool1", subnet="10.213.73.0/24")
    eng = DockerEngine(_with_pool(config, size=1), firewall)
    spec = new_spec("closing")
    try:
        await eng.prepare(spec)
        await wait_ready(eng, spec)
        (member,) = eng.warm_pool.members()
    finally:
        await eng.close()
    client = dockerd.client()
    try:
        assert not client.containers.list(
            all=True, filters={"label": f"{LABEL}={member.sandbox_id}"}
        )
    finally:
        client.close()
    assert not (config.sandboxes_dir / member.sandbox_id).exists()
    assert member.sandbox_id not in firewall.members()


def host_cpu_shares(pid: int) -> int:
    """``cpu.shares`` of process ``pid``'s cgroup, read on the host (cgroup v1)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            for mount in ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"):
                shares = Path(mount + path) / "cpu.shares"
                if shares.is_file():
                    return int(shares.read_text())
    raise AssertionError(f"no cpu.shares for {pid}")


async def test_runsc_sandboxes_come_from_the_pool_renamed_inside_gvisor(
    dockerd: Dockerd, tmp_path: Path
) -> None:
    """gVisor's UTS namespace is out of the host's reach: the name comes from a
    privileged exec of the host's busybox, mounted read-only (kiln.engine.docker.hostname)."""
    if base_tree_missing():
        pytest.skip(str(base_tree_missing()))
    config = engine_config(tmp_path, dockerd, bridge="kd-pool3", subnet="10.213.71.0/24")
    eng = DockerEngine(_with_pool(config, size=1))
    first = new_spec(
        "gv_one",
        runtime="runsc",
        env={"SECRET": "one"},
        files=(FileSpec("/home/sandbox/secret.txt", b"first user\n", 0o600),),
    )
    try:
        await eng.prepare(first)
        member = await claimed(eng, first)
        sid = first.sandbox_id
        check = 'echo "$SECRET $(hostname) $(cat /etc/hostname)"; grep -c gv-one /etc/hosts'
        assert (await run(eng, sid, check)).split() == ["one", "gv-one", "gv-one", "1"]
        assert (await run(eng, sid, "cat /home/sandbox/secret.txt")) == "first user\n"
        pid = (await eng.inspect(sid))["State"]["Pid"]
        assert host_cpu_shares(pid) == NORMAL_CPU_SHARES
        # The setter is the host's, and root in the sandbox cannot change it.
        client = await eng.agent(sid)
        tamper = await client.exec(["sh", "-c", "echo evil > /usr/lib/kiln/busybox"], user="root")
        assert tamper.exit_code != 0
        # Docker starts it under the member's name again: renamed at every start, and
        # its weight a sandbox's though Docker's config keeps the member's (no update
        # in runsc).
        await eng.stop(sid)
        await eng.start(sid)
        assert (await run(eng, sid, check)).split() == ["one", "gv-one", "gv-one", "1"]
        pid = (await eng.inspect(sid))["State"]["Pid"]
        assert host_cpu_shares(pid) == NORMAL_CPU_SHARES
        await eng.destroy(sid)
        # The next user's sandbox: another member, nothing of the first.
        second = new_spec("gv_two", owner="bob", runtime="runsc")
        assert await claimed(eng, second) != member
        out = await run(
            eng,
            second.sandbox_id,
            check.replace("gv-one", "gv-two") + "; ls /home/sandbox/s* || true",
        )
        assert out.split()[:4] == ["gv-two", "gv-two", "1", "ls:"], out
        await eng.destroy(second.sandbox_id)
    finally:
        await eng.close()


async def test_size_zero_means_no_pool(engine: DockerEngine, tmp_path: Path) -> None:
    config = _with_pool(engine.config, size=0)
    eng = DockerEngine(config)
    spec = new_spec("no-pool")
    eng.warm_pool.start(spec, "runc")
    assert eng.warm_pool.members() == [] and not eng.warm_pool.fits(spec, "runc")
    await eng.close()
