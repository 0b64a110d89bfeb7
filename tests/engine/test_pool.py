"""The warm pool on real TCG microVMs: claim, refill, fallback, and isolation
between the users whose sandboxes come from it.

One module engine with a pool of one member of a small shape: a claim empties
it, so the create right after falls back, and the refill makes the next member.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kiln.agent_client import AgentClient, AuthError
from kiln.engine import FileSpec, SandboxSpec
from kiln.engine.qemu import QemuEngine
from kiln.engine.qemu.pool import MEMBER_PREFIX, REFILL_NICE
from kiln.engine.qemu.process import pid_alive

from .conftest import VMEnv, wait_until

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
]

SHAPE = SandboxSpec(sandbox_id="shape", name="shape", memory_mb=256)
#: Long enough for a refill (a template restore under nice) on a busy 2-core host.
REFILL_TIMEOUT = 180.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(vm_env: VMEnv) -> AsyncIterator[QemuEngine]:
    eng = QemuEngine(vm_env.config(pool_size=1, pool_memory_mb=1024))
    try:
        await eng.prepare(SHAPE)
        yield eng
    finally:
        for info in eng.list():
            await eng.destroy(info.sandbox_id)
        await eng.close()


def user_spec(sid: str, who: str) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=sid,
        name=f"box-{who}",
        memory_mb=256,
        env={"WHO": who},
        files=(FileSpec(f"/etc/{who}.txt", f"secret of {who}\n".encode(), 0o600),),
        init=f"echo init {who} > /tmp/init.txt",
    )


def nice_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[16])


async def sh(client: AgentClient, script: str) -> str:
    result = await client.exec(["sh", "-c", script], timeout=60)
    assert result.exit_code == 0, (script, result)
    return result.stdout.decode()


async def until_ready(engine: QemuEngine) -> None:
    await wait_until(
        lambda: engine.warm_pool.ready(SHAPE) == 1, timeout=REFILL_TIMEOUT, interval=0.2
    )


async def looks(client: AgentClient) -> dict[str, str]:
    out = await sh(
        client,
        "echo \"$WHO\"; hostname; cat /etc/*.txt 2>/dev/null | tr '\\n' ' '; echo;"
        " until [ -s /tmp/init.txt ]; do sleep 0.1; done; cat /tmp/init.txt;"
        " date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo",
    )
    who, host, files, init, clock, rng = out.splitlines()
    return {"who": who, "host": host, "files": files, "init": init, "clock": clock, "rng": rng}


async def test_claim_refill_fallback_and_isolation(engine: QemuEngine) -> None:
    pool = engine.warm_pool
    await until_ready(engine)
    (member,) = pool.members()
    assert member.sandbox_id.startswith(MEMBER_PREFIX)
    assert member.pid is not None and nice_of(member.pid) == REFILL_NICE  # low priority
    assert engine.list() == []  # members are nobody's sandboxes

    a = await engine.create(user_spec("user-a", "alice"))
    assert "configure" in engine.last_phases("user-a")  # claimed, not restored
    assert engine.paths("user-a") == member.paths  # the member's machine
    assert nice_of(engine.pid("user-a") or 0) == 0  # back to normal priority
    # The pool is empty now (one member, refilling): this create takes the old path.
    b = await engine.create(user_spec("user-b", "bob"))
    assert "restore" in engine.last_phases("user-b")
    assert pool.misses >= 1

    await until_ready(engine)
    c = await engine.create(user_spec("user-c", "carol"))
    assert "configure" in engine.last_phases("user-c")
    assert pool.claims == 2

    seen = {}
    for info, who in ((a, "alice"), (b, "bob"), (c, "carol")):
        client = await engine.agent(info.sandbox_id)
        got = await looks(client)
        assert got["who"] == who
        assert got["host"] == f"box-{who}"
        assert got["files"].split() == ["secret", "of", who]  # nobody else's file
        assert got["init"] == f"init {who}"
        assert abs(int(got["clock"]) - time.time()) < 5  # the clock was set at the claim
        seen[who] = got["rng"]
    assert len(set(seen.values())) == 3  # no two share RNG output

    # A token of one sandbox opens no other, and the member's is gone with it.
    c_client = engine.client("user-c")
    for stale in (engine.client("user-a").token, member.record.token):
        foreign = AgentClient(c_client.endpoint, stale, connect_timeout=5, auth_timeout=5)
        with pytest.raises(AuthError):
            await foreign.activity()
    assert {i.sandbox_id for i in engine.list()} == {"user-a", "user-b", "user-c"}


async def test_a_claimed_sandbox_is_an_ordinary_one(engine: QemuEngine) -> None:
    # Orphan cleanup knows the claimed sandbox's directory (its member's) and the
    # members waiting in the pool.
    await until_ready(engine)
    assert await engine.cleanup_orphans() == []
    # A cold stop and start brings it back on its member's TAP and address.
    await engine.stop("user-a")
    await engine.start("user-a")
    client = await engine.agent("user-a")
    assert (await sh(client, "echo $WHO; cat /etc/alice.txt")).split() == [
        "alice",
        "secret",
        "of",
        "alice",
    ]
    # Its record says whose network it uses; destroy removes it all.
    root = engine.paths("user-a").root
    await engine.destroy("user-a")
    assert not root.exists()

    # Its QEMU killed, it boots again from its disks and its own config drive (not
    # the member's): same token, hostname and env.
    pid = engine.pid("user-c")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    marker = engine.paths("user-c").marker
    await wait_until(lambda: not pid_alive(pid, marker))
    client = await engine.agent("user-c")
    boot = engine.info("user-c").last_boot
    assert boot is not None and str(boot.reason) == "rebooted"
    assert (await sh(client, "echo $WHO; hostname")).split() == ["carol", "box-carol"]


async def test_a_member_that_died_is_dropped_and_the_create_goes_on(engine: QemuEngine) -> None:
    await until_ready(engine)
    (member,) = engine.warm_pool.members()
    assert member.pid is not None
    os.kill(member.pid, signal.SIGKILL)
    await wait_until(lambda: not pid_alive(member.pid, member.paths.marker))
    await engine.create(user_spec("user-d", "dave"))
    assert "restore" in engine.last_phases("user-d")  # the ordinary path
    assert not member.paths.root.exists()
    client = await engine.agent("user-d")
    assert (await sh(client, "echo $WHO")) == "dave\n"


async def test_a_shape_of_its_own_and_close(vm_env: VMEnv, tmp_path: Path) -> None:
    """``pool_shapes`` pools a shape of 2 vCPUs and none of the default-size one; a
    create of that shape takes its member, the other shape the ordinary path; close
    destroys the member that waits."""
    own = VMEnv(vm_env.netns, tmp_path, subnet="10.213.8.0/24", bridge="kt-br8")
    eng = QemuEngine(
        own.config(pool_size=0, pool_memory_mb=1024, pool_shapes=(("minimal", 2, 256, 1),))
    )
    small = SandboxSpec(sandbox_id="shape", name="shape", memory_mb=256)
    big = SandboxSpec(sandbox_id="shape", name="shape", cpus=2, memory_mb=256)
    try:
        await eng.prepare(small)
        await eng.prepare(big)
        await wait_until(lambda: eng.warm_pool.ready(big) == 1, timeout=REFILL_TIMEOUT)
        (member,) = eng.warm_pool.members()
        assert member.record.spec.cpus == 2 and eng.warm_pool.ready(small) == 0

        await eng.create(dataclasses.replace(user_spec("two", "erin"), cpus=2))
        assert "configure" in eng.last_phases("two")
        assert (await sh(await eng.agent("two"), "nproc; echo $WHO")).split() == ["2", "erin"]
        await eng.create(user_spec("one", "frank"))
        assert "restore" in eng.last_phases("one")
        assert (await sh(await eng.agent("one"), "nproc")).strip() == "1"
        for sid in ("two", "one"):
            await eng.destroy(sid)

        await wait_until(lambda: eng.warm_pool.ready(big) == 1, timeout=REFILL_TIMEOUT)
        (member,) = eng.warm_pool.members()
        pid = member.pid
    finally:
        await eng.close()
    assert not member.paths.root.exists()
    assert pid is not None and not pid_alive(pid, member.paths.marker)


async def test_the_config_drive_is_written_after_the_claim(engine: QemuEngine) -> None:
    """A claim leaves its config drive due (the mkfs would compete with the sandbox's
    first requests); a boot from its disks before the refill task gets to it writes
    the drive itself. A file the guest cannot write fails no claim (as at boot)."""
    await until_ready(engine)
    spec = dataclasses.replace(
        user_spec("user-e", "erin"),
        files=(
            FileSpec("/proc/version/cannot", b"x"),  # under a file: the guest logs it
            FileSpec("/etc/erin.txt", b"secret of erin\n", 0o600),
        ),
        init=None,
    )
    await engine.create(spec)
    assert "configure" in engine.last_phases("user-e")
    paths = engine.paths("user-e")
    assert paths.drive_due.exists()  # the refill task waits for the claim to settle
    client = await engine.agent("user-e")
    assert (
        await sh(client, "cat /etc/erin.txt; cat /etc/hostname; grep -c box-erin /etc/hosts")
    ).split() == [
        "secret",
        "of",
        "erin",
        "box-erin",
        "1",
    ]
    # Its QEMU dies at once: the boot from its disks writes the due drive first.
    pid = engine.pid("user-e")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: not pid_alive(pid, paths.marker))
    client = await engine.agent("user-e")
    boot = engine.info("user-e").last_boot
    assert boot is not None and str(boot.reason) == "rebooted"
    assert (await sh(client, "echo $WHO; hostname")).split() == ["erin", "box-erin"]
    assert not paths.drive_due.exists()

    # Otherwise the refill task writes it, once the claim has settled.
    await until_ready(engine)
    await engine.create(dataclasses.replace(user_spec("user-f", "fay"), init=None))
    due = engine.paths("user-f").drive_due
    assert due.exists()
    await wait_until(lambda: not due.exists(), timeout=REFILL_TIMEOUT, interval=0.2)
    for sid in ("user-e", "user-f"):
        await engine.destroy(sid)
