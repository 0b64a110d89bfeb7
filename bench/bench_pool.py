"""The QEMU engine's warm pool on real microVMs, beside plain Docker in the same run.

    .venv/bin/python -m bench pool

A QemuEngine with a pool of POOL members of the default shape, in a network
namespace of its own (deleted at the end), temporary data directory. Measured:

* create → agent ready, and → its first ``exec true`` done: from the template
  (before the pool starts), then claimed from the pool (each create waits for
  the refill first, which is not timed);
* exec ``true`` in a running sandbox: the warm-exec reference;
* creates back to back from an empty pool (claims, then the ordinary path while
  the refill runs): the rate sustained, against the template path's;
* exec ``true`` in a running sandbox while the pool refills, against idle;
* plain Docker (a private dockerd, runc, busybox): ``docker run -d`` → its first
  ``docker exec true`` done, and a warm ``exec true`` (Engine API), when
  docker.io is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from kiln.engine import FileSpec, SandboxSpec
from kiln.engine.qemu import QemuConfig, QemuEngine
from kiln.network import NetworkConfig

from ._harness import engine_scratch
from ._stats import Row, print_table, print_values

REQUIRES: str | None = "root, qemu-system-x86_64, a kiln image; docker.io for the reference"

POOL = 2
CREATES = 10
BURST = 6
EXECS = 30
REFILL_TIMEOUT = 300.0


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (TAP devices, network namespaces)"
    for tool in ("qemu-system-x86_64", "ip", "mkfs.ext4", "qemu-img", "nice"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def user_spec(sid: str) -> SandboxSpec:
    """What a user's create carries: env, a file, a name."""
    return SandboxSpec(
        sandbox_id=sid,
        name=sid,
        env={"API_KEY": secrets.token_hex(16)},
        files=(FileSpec("/workspace/task.json", b'{"task": 1}\n', 0o644),),
    )


async def wait_full(engine: QemuEngine, shape: SandboxSpec, n: int = POOL) -> float:
    start = time.perf_counter()
    deadline = time.monotonic() + REFILL_TIMEOUT
    while engine.warm_pool.ready(shape) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not refill in time")
        await asyncio.sleep(0.05)
    return ms_since(start)


async def create_and_exec(engine: QemuEngine, sid: str) -> tuple[float, float, bool]:
    """(create → ready ms, create → first exec done ms, came from the pool)."""
    start = time.perf_counter()
    await engine.create(user_spec(sid))
    ready = ms_since(start)
    result = await (await engine.agent(sid)).exec(["true"])
    assert result.exit_code == 0, result
    return ready, ms_since(start), "configure" in engine.last_phases(sid)


async def exec_samples(engine: QemuEngine, sid: str, n: int) -> list[float]:
    client = await engine.agent(sid)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await client.exec(["true"])
        out.append(ms_since(start))
    return out


async def run(data_dir: Path, netns: str, rows: list[Row], values: list[Any]) -> None:
    config = QemuConfig(
        data_dir=data_dir,
        network=NetworkConfig(bridge="kp-br0", subnet="10.213.10.0/24", netns=netns, nat=False),
        pool_size=POOL,
        pool_memory_mb=POOL * 512,
    )
    engine = QemuEngine(config)
    shape = SandboxSpec(sandbox_id="shape", name="shape")
    try:
        # The template first (a create builds it); the pool starts with prepare().
        await engine.create(user_spec("t-warm"))
        await engine.destroy("t-warm")
        plain_ready, plain_exec = [], []
        for i in range(CREATES):
            ready, done, pooled = await create_and_exec(engine, f"t{i}")
            assert not pooled
            plain_ready.append(ready)
            plain_exec.append(done)
            await engine.destroy(f"t{i}")

        await engine.prepare(shape)
        refills = [await wait_full(engine, shape)]
        pool_ready, pool_exec, phases = [], [], []
        for i in range(CREATES):
            ready, done, pooled = await create_and_exec(engine, f"p{i}")
            assert pooled, engine.last_phases(f"p{i}")
            pool_ready.append(ready)
            pool_exec.append(done)
            phases.append(engine.last_phases(f"p{i}"))
            await engine.destroy(f"p{i}")
            refills.append(await wait_full(engine, shape))

        # A running sandbox: the warm exec reference, idle and during a refill.
        await engine.create(user_spec("run"))
        await exec_samples(engine, "run", 5)
        idle = await exec_samples(engine, "run", EXECS)
        during: list[float] = []
        for n in range(3):
            await engine.create(user_spec(f"r{n}"))  # a claim: the refill starts
            while engine.warm_pool.ready(shape) < POOL:
                during += await exec_samples(engine, "run", 1)
            await engine.destroy(f"r{n}")

        # Back to back from an empty pool: claims first, then the ordinary path.
        burst_ready, kinds = [], []
        start = time.perf_counter()
        for i in range(BURST):
            ready, _done, pooled = await create_and_exec(engine, f"b{i}")
            burst_ready.append(ready)
            kinds.append("pool" if pooled else "template")
        burst_s = time.perf_counter() - start
        for i in range(BURST):
            await engine.destroy(f"b{i}")

        rows.append(Row("create → agent ready: template restore", plain_ready))
        rows.append(Row("create → agent ready: from the pool", pool_ready, "≤ 50"))
        rows.append(Row("create → first exec done: template restore", plain_exec))
        rows.append(
            Row(
                "create → first exec done: from the pool",
                pool_exec,
                f"≤ 2x warm exec p50 = {2 * Row('', idle).pct(50):.0f}",
            )
        )
        rows.append(Row("warm exec true, running sandbox, idle host", idle))
        rows.append(
            Row(
                "exec true, same sandbox, during pool refill",
                during,
                f"≤ 1.5x idle p50 = {1.5 * Row('', idle).pct(50):.0f}",
            )
        )
        rows.append(Row("refill to full after a claim (nice 19)", refills[1:]))
        rows.append(Row(f"create → ready, {BURST} back to back, pool of {POOL}", burst_ready))
        names = list(phases[0])
        medians = [f"{n} {Row(n, [p[n] for p in phases if n in p]).pct(50):.1f}" for n in names]
        values.append(("claim phases p50 (ms)", ", ".join(medians), ""))
        plain_rate = CREATES / (sum(plain_exec) / 1000)
        values.append(
            (
                f"creates/s back to back from an empty pool ({' '.join(kinds)})",
                f"{BURST / burst_s:.2f} (template path alone: {plain_rate:.2f})",
                "",
            )
        )
        pool = engine.warm_pool
        values.append(("pool: claims / misses", f"{pool.claims} / {pool.misses}", ""))
    finally:
        for info in engine.list():
            with contextlib.suppress(Exception):
                await engine.destroy(info.sandbox_id)
        await engine.close()


def docker_reference(rows: list[Row]) -> str | None:
    """docker run -d → first exec true done, and a warm exec, runc; None or why not."""
    try:
        from kiln.engine.docker.testing import (  # noqa: PLC0415
            busybox_rootfs_tar,
            import_rootfs,
            private_dockerd,
            unavailable_reason,
        )
    except ImportError as exc:
        return f"the Docker engine does not import: {exc}"
    reason = unavailable_reason()
    if reason is not None:
        return reason
    image = "kiln-bench/busybox:latest"
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-pool-dockerd-"))
    try:
        with private_dockerd(root) as d, contextlib.closing(d.client()) as client:
            import_rootfs(client, busybox_rootfs_tar(), image)
            first, warm = [], []
            for _ in range(CREATES):
                start = time.perf_counter()
                c = client.containers.run(image, ["sleep", "1000"], detach=True)
                _exec_true(client, c.id)
                first.append(ms_since(start))
                c.remove(force=True)
            c = client.containers.run(image, ["sleep", "1000"], detach=True)
            for _ in range(5):
                _exec_true(client, c.id)
            for _ in range(EXECS):
                start = time.perf_counter()
                _exec_true(client, c.id)
                warm.append(ms_since(start))
            c.remove(force=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows.append(Row("docker: run -d → first exec true done", first))
    rows.append(Row("docker: warm exec true (Engine API)", warm))
    return None


def _exec_true(client: Any, cid: str) -> None:
    result = client.api.exec_create(cid, ["true"])
    client.api.exec_start(result["Id"])
    code = client.api.exec_inspect(result["Id"])["ExitCode"]
    assert code == 0, code


def main() -> None:
    rows: list[Row] = []
    values: list[tuple[str, str, str]] = []
    with engine_scratch("pool") as (data_dir, netns):
        asyncio.run(run(data_dir, netns, rows, values))
    why_not = docker_reference(rows)
    if why_not is not None:
        values.append(("docker reference", "skipped", why_not))
    print_table("warm pool (QEMU engine, TCG) beside plain Docker", rows)
    print_values("warm pool: single values", values)


if __name__ == "__main__":
    main()
