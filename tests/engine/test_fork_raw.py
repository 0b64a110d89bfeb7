"""Fork of a sandbox whose root disk is a full raw copy (``disk_mode: copy``): the
clone's QEMU starts while that disk and the RAM are still being copied into it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from kiln.agent_client import AgentClient
from kiln.engine.qemu import QemuEngine

from .conftest import VMEnv
from .test_fork import COUNTER, counting, sh, spec

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
]


async def drop_caches(client: AgentClient) -> None:
    """What is read next comes from the disk, not the page cache."""
    result = await client.exec(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], user="root")
    assert result.exit_code == 0, result


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(vm_env: VMEnv) -> AsyncIterator[QemuEngine]:
    eng = QemuEngine(vm_env.config(disk_mode="copy"))
    try:
        yield eng
    finally:
        for info in eng.list():
            await eng.destroy(info.sandbox_id)
        await eng.close()


async def test_a_raw_disk_fork_has_the_whole_disk_and_memory(engine: QemuEngine) -> None:
    await engine.create(spec("src"))
    src = await engine.agent("src")
    await src.write_file("/tmp/counter.py", COUNTER.encode())
    await sh(src, "setsid nohup python3 /tmp/counter.py >/dev/null 2>&1 &")
    # Spread over the disk, so the copy has more than one extent to move.
    await sh(
        src, "head -c 8M /dev/urandom > /home/sandbox/big && md5sum /home/sandbox/big > /tmp/sum"
    )
    token, _ = await counting(src)

    for sid in ("hot-clone", "cold-clone"):
        if sid == "cold-clone":
            await engine.stop("src")
        await engine.fork("src", spec(sid))
        clone = await engine.agent(sid)
        assert (await sh(clone, "hostname")).strip() == sid
        # The disk as the source had it.
        await drop_caches(clone)
        assert await sh(clone, "md5sum /home/sandbox/big") == await sh(clone, "cat /tmp/sum")
        assert (await counting(clone))[0] == token
        # And it writes to its own.
        await sh(clone, f"echo {sid} > /home/sandbox/mine")
        await drop_caches(clone)
        assert (await sh(clone, "cat /home/sandbox/mine")).strip() == sid
        await engine.destroy(sid)
    src = await engine.agent("src")
    assert await sh(src, "test -e /home/sandbox/mine || echo absent") == "absent\n"
