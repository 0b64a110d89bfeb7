"""The Docker engine's warm pool against its ordinary create and plain Docker, in one run.

    .venv/bin/python -m bench docker_pool

A private dockerd (``kiln.engine.docker.testing.private_dockerd``, a network
namespace of its own) with kiln's rootfs imported once; per runtime (runc, then
runsc: ``KILN_BENCH_RUNTIMES=runc`` for one), two Docker engines on it (their
own bridges and state): one with a pool of one member (``pool_size=1``), one
without. Per iteration, in an order that rotates so that a change in host load
hits all alike:

* kiln, from the pool: ``engine.create`` (a claim) → agent ready, and → its first
  ``exec true`` done (the pool is full before each: its refill is not timed);
* kiln, ordinary create: the same, on the engine without a pool;
* plain Docker, the reference: ``docker run -d`` of the same image and runtime
  (``sleep infinity``; Engine API create + start) → its first ``docker exec true``
  done (exec create + start + inspect).

Then: warm ``exec true`` in a running kiln sandbox, idle and while the pool
refills (the refill's container runs at CPU weight 2); the refill's own time
after a claim. Skipped when no private dockerd can run or kiln's base rootfs is
missing. Everything is removed at the end, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kiln.engine import FileSpec, SandboxSpec
from kiln.engine.docker import images as docker_images
from kiln.engine.docker.engine import DockerEngine
from kiln.engine.docker.testing import engine_config, private_dockerd

from ._stats import Row, print_table, print_values
from .bench_docker import exec_true
from .bench_docker_engine import run_plain
from .bench_docker_engine import skip_reason as docker_engine_skip_reason

REQUIRES: str | None = "root, docker.io (Debian), kiln's base rootfs"

CREATES = 12
EXECS = 30
REFILL_TIMEOUT = 120.0
SHAPE: dict[str, Any] = {"cpus": 1, "memory_mb": 256, "engine": "docker"}
RUNTIMES = ("runc", "runsc")


def skip_reason() -> str | None:
    return docker_engine_skip_reason()


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def user_spec(sid: str, runtime: str) -> SandboxSpec:
    """What a user's create carries: env, a file, a name."""
    return SandboxSpec(
        sandbox_id=sid,
        name=sid,
        runtime=runtime,
        env={"API_KEY": secrets.token_hex(16)},
        files=(FileSpec("/workspace/task.json", b'{"task": 1}\n', 0o644),),
        **SHAPE,
    )


async def wait_full(engine: DockerEngine, shape: SandboxSpec) -> float:
    start = time.perf_counter()
    deadline = time.monotonic() + REFILL_TIMEOUT
    while engine.warm_pool.ready(shape, shape.runtime or "runc") < engine.config.pool_size:
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not refill in time")
        await asyncio.sleep(0.02)
    return ms_since(start)


async def create_and_exec(engine: DockerEngine, sid: str, runtime: str) -> tuple[float, float]:
    """(create → ready ms, create → first exec done ms); the sandbox is destroyed after."""
    start = time.perf_counter()
    await engine.create(user_spec(sid, runtime))
    ready = ms_since(start)
    result = await (await engine.agent(sid)).exec(["true"])
    done = ms_since(start)
    assert result.exit_code == 0, result
    await engine.destroy(sid)
    return ready, done


async def exec_samples(engine: DockerEngine, sid: str, n: int) -> list[float]:
    client = await engine.agent(sid)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await client.exec(["true"])
        out.append(ms_since(start))
    return out


async def run(
    root: Path, tables: list[tuple[str, list[Row]]], values: list[tuple[str, str, str]]
) -> None:
    with (
        private_dockerd(root / "dockerd") as dockerd,
        contextlib.closing(dockerd.client(timeout=600)) as client,
    ):
        image = await asyncio.to_thread(docker_images.ensure_image, client, "minimal")
        wanted = os.environ.get("KILN_BENCH_RUNTIMES", ",".join(RUNTIMES)).split(",")
        for n, runtime in enumerate(r for r in RUNTIMES if r in wanted):
            rows: list[Row] = []
            await run_runtime(root / runtime, dockerd, client, image, runtime, 2 * n, rows, values)
            tables.append((runtime, rows))


async def run_runtime(  # noqa: PLR0917
    root: Path,
    dockerd: Any,
    client: Any,
    image: str,
    runtime: str,
    index: int,
    rows: list[Row],
    values: list[tuple[str, str, str]],
) -> None:
    pooled_config = engine_config(
        root / "pooled", dockerd, bridge=f"kd-bp{index}", subnet=f"10.213.{64 + index}.0/24"
    )
    pooled = DockerEngine(dataclasses.replace(pooled_config, pool_size=1))
    plain = DockerEngine(
        engine_config(
            root / "plain",
            dockerd,
            bridge=f"kd-bp{index + 1}",
            subnet=f"10.213.{65 + index}.0/24",
        )
    )
    shape = user_spec("shape", runtime)
    try:
        for engine in (plain, pooled):
            await engine.prepare(shape)
            await create_and_exec(engine, f"warm-{secrets.token_hex(2)}", runtime)

        samples: dict[str, list[float]] = {
            k: [] for k in ("pool ready", "pool exec", "ord ready", "ord exec", "docker exec")
        }
        misses = pooled.warm_pool.misses

        async def from_pool(i: int) -> None:
            await wait_full(pooled, shape)
            ready, done = await create_and_exec(pooled, f"p{i}", runtime)
            samples["pool ready"].append(ready)
            samples["pool exec"].append(done)

        async def ordinary(i: int) -> None:
            ready, done = await create_and_exec(plain, f"o{i}", runtime)
            samples["ord ready"].append(ready)
            samples["ord exec"].append(done)

        async def docker_run(i: int) -> None:
            def work() -> float:
                start = time.perf_counter()
                cid, _ = run_plain(client, image, runtime)
                exec_true(client, cid)
                took = ms_since(start)
                client.api.remove_container(cid, force=True)
                return took

            samples["docker exec"].append(await asyncio.to_thread(work))

        sides: list[Callable[[int], Awaitable[None]]] = [from_pool, ordinary, docker_run]
        for i in range(CREATES):
            turn = sides[i % 3 :] + sides[: i % 3]
            for side in turn:
                await side(i)
        assert pooled.warm_pool.misses == misses, "a timed create missed the pool"

        # A running sandbox: warm exec, idle and while the pool refills.
        await pooled.create(user_spec("run", runtime))
        await wait_full(pooled, shape)
        await exec_samples(pooled, "run", 5)
        idle = await exec_samples(pooled, "run", EXECS)
        during: list[float] = []
        refills: list[float] = []
        for n in range(4):
            await pooled.create(user_spec(f"r{n}", runtime))  # a claim: the refill starts
            start = time.perf_counter()
            while pooled.warm_pool.ready(shape, runtime) < 1:
                during += await exec_samples(pooled, "run", 1)
            refills.append(ms_since(start))
            await pooled.destroy(f"r{n}")

        rows.append(Row("docker run -d → first exec true (reference)", samples["docker exec"]))
        rows.append(Row("create → agent ready, ordinary", samples["ord ready"]))
        rows.append(Row("create → agent ready, from the pool", samples["pool ready"]))
        rows.append(Row("create → first exec done, ordinary", samples["ord exec"]))
        rows.append(
            Row(
                "create → first exec done, from the pool",
                samples["pool exec"],
                f"< docker run+exec p50 = {Row('', samples['docker exec']).pct(50):.0f}",
            )
        )
        rows.append(Row("warm exec true, idle", idle))
        rows.append(Row("exec true during a pool refill", during))
        rows.append(Row("refill after a claim (incl. 1 s settle)", refills))
        pool = pooled.warm_pool
        values.append((f"{runtime} pool: claims / misses", f"{pool.claims} / {pool.misses}", ""))
    finally:
        for engine in (pooled, plain):
            for info in engine.list():
                with contextlib.suppress(Exception):
                    await engine.destroy(info.sandbox_id)
            await engine.close()


def main() -> None:
    tables: list[tuple[str, list[Row]]] = []
    values: list[tuple[str, str, str]] = []
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-dpool-"))
    try:
        asyncio.run(run(root, tables, values))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for runtime, rows in tables:
        print_table(
            f"warm pool (Docker engine, {runtime}) beside its ordinary create and plain Docker",
            rows,
        )
    print_values("docker warm pool: single values", values)


if __name__ == "__main__":
    main()
