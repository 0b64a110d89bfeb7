"""QEMU engine latencies on real microVMs (TCG on the dev hosts).

    .venv/bin/python -m bench engine

Runs in a network namespace of its own (``kb-<random>``, deleted at the end)
with a temporary data directory; builds one template, then creates CREATES sandboxes from it
and boots BOOTS (a spec with more volumes than template disk slots), one after another.
Numbers include everything a daemon would pay: the agent client, the netns
dialer, QMP and the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kiln.agent_client import AgentClient, Stdout
from kiln.engine import SandboxSpec, VolumeSpec
from kiln.engine.qemu import QemuConfig, QemuEngine
from kiln.engine.qemu.templates import VOLUME_SLOTS
from kiln.network import NetworkConfig

from ._harness import engine_scratch
from ._stats import Row, print_table, print_values

REQUIRES: str | None = "root, qemu-system-x86_64, a kiln image (built on first use, ~1 min)"

CREATES = 10
BOOTS = 2
MIB = 1 << 20


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (TAP devices, network namespaces)"
    for tool in ("qemu-system-x86_64", "ip", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


async def timed(fn: Callable[[], Awaitable[object]], n: int, warmup: int = 0) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def phase_summary(runs: list[dict[str, float]]) -> str:
    names = list(runs[0]) if runs else []
    return ", ".join(f"{n} {Row(n, [r[n] for r in runs if n in r]).pct(50):.0f}" for n in names)


def rss_kib(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0])
    return fields


async def run(data_dir: Path, netns: str) -> None:
    config = QemuConfig(
        data_dir=data_dir,
        network=NetworkConfig(bridge="kb-br0", subnet="10.213.9.0/24", netns=netns, nat=False),
    )
    engine = QemuEngine(config)
    rows: list[Row] = []
    values: list[tuple[str, str, str]] = []
    try:
        # -- create → agent ready, destroy ------------------------------------------
        # The first create of a shape builds its template (a boot and a stop); every
        # create after it restores. A spec with a volume still boots.
        start = time.perf_counter()
        await engine.prepare(SandboxSpec(sandbox_id="prep", name="prep"))
        values.append(
            (
                "template build (boot + stop), once per shape",
                f"{(time.perf_counter() - start) * 1000:.0f} ms",
                "",
            )
        )
        create_ms, first_exec_ms, boot_ms, destroy_ms = [], [], [], []
        create_phases: list[dict[str, float]] = []
        for i in range(CREATES):
            spec = SandboxSpec(sandbox_id=f"c{i}", name=f"c{i}")
            start = time.perf_counter()
            await engine.create(spec)
            create_ms.append((time.perf_counter() - start) * 1000)
            create_phases.append(engine.last_phases(spec.sandbox_id))
            # What a user waits for next: the new guest still translates everything
            # it runs for the first time (TCG).
            start = time.perf_counter()
            await (await engine.agent(spec.sandbox_id)).exec(["true"])
            first_exec_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await engine.destroy(spec.sandbox_id)
            destroy_ms.append((time.perf_counter() - start) * 1000)
        for i in range(BOOTS):
            # More volumes than a template has disk slots: this create boots.
            volumes = tuple(
                VolumeSpec(f"bv{i}-{n}", f"/mnt/v{n}", 8) for n in range(VOLUME_SLOTS + 1)
            )
            spec = SandboxSpec(sandbox_id=f"b{i}", name=f"b{i}", volumes=volumes)
            start = time.perf_counter()
            await engine.create(spec)
            boot_ms.append((time.perf_counter() - start) * 1000)
            await engine.destroy(spec.sandbox_id)
        rows.append(Row("create → agent ready (from template)", create_ms, "≤ 3500"))
        rows.append(Row("  then its first exec true", first_exec_ms))
        rows.append(Row("create → agent ready (boot: 5 volumes)", boot_ms))

        # -- one sandbox for everything else ------------------------------------------
        sid = "bench"
        await engine.create(SandboxSpec(sandbox_id=sid, name=sid, memory_mb=512))
        client = await engine.agent(sid)
        rows.append(
            Row("exec true x100", await timed(lambda: client.exec(["true"]), 100, 10), "≤ 40")
        )

        payload = secrets.token_bytes(1024)

        def write_read(path: str) -> Callable[[], Awaitable[None]]:
            async def cycle() -> None:
                await client.write_file(path, payload)
                assert (await client.read_file(path)).data == payload

            return cycle

        rows.append(
            Row(
                "1 KB write + read x50 (/tmp)",
                await timed(write_read("/tmp/bench-1k"), 50, 5),
                "≤ 15",
            )
        )
        # On the ext4 disk the write's two fsyncs (file, directory) are real work.
        rows.append(
            Row(
                "1 KB write + read x50 (/workspace, fsynced)",
                await timed(write_read("/workspace/bench-1k"), 50, 5),
            )
        )

        async def parallel_reads() -> None:
            await asyncio.gather(*(client.read_file("/tmp/bench-1k") for _ in range(5)))

        rows.append(Row("5 parallel 1 KB reads (wall)", await timed(parallel_reads, 20, 2)))

        async def concurrent_execs() -> None:
            await asyncio.gather(*(client.exec(["true"]) for _ in range(10)))

        rows.append(Row("10 concurrent exec true (wall)", await timed(concurrent_execs, 10, 1)))

        ttfb: list[float] = []

        async def stream() -> None:
            start = time.perf_counter()
            first = None
            async with client.exec_stream(["sh", "-c", "echo first; echo second"]) as proc:
                async for event in proc:
                    if first is None and isinstance(event, Stdout):
                        first = (time.perf_counter() - start) * 1000
                await proc.wait()
            ttfb.append(first if first is not None else float("nan"))

        total = await timed(stream, 20, 2)
        rows.append(Row("streaming exec: first byte", ttfb[-20:]))
        rows.append(Row("streaming exec: total", total))

        lines = b"".join(b"line %05d of the benchmark file\n" % i for i in range(10_000))
        await client.write_file("/tmp/bench-10k", lines)
        rows.append(
            Row(
                "read 10,000-line file: full",
                await timed(lambda: client.read_file("/tmp/bench-10k"), 20, 2),
            )
        )
        rows.append(
            Row(
                "read 10,000-line file: limit=10",
                await timed(lambda: client.read_file("/tmp/bench-10k", limit=10), 20, 2),
            )
        )

        # -- thermal ----------------------------------------------------------------
        pause_ms, resume_ms, warm_exec_ms = [], [], []
        for _ in range(20):
            start = time.perf_counter()
            await engine.pause(sid)
            pause_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await engine.resume(sid)
            resume_ms.append((time.perf_counter() - start) * 1000)
        rows.append(Row("pause (QMP stop)", pause_ms, "≤ 5"))
        rows.append(Row("resume (QMP cont; the clock is set after)", resume_ms, "≤ 5"))
        for _ in range(5):
            await engine.pause(sid)
            start = time.perf_counter()
            warm = await engine.agent(sid)
            await warm.exec(["true"])
            warm_exec_ms.append((time.perf_counter() - start) * 1000)
        rows.append(Row("warm → exec (ensure_hot + exec)", warm_exec_ms, "≤ 50"))

        await asyncio.sleep(3)  # idle
        await engine.pause(sid)
        pid = engine.pid(sid)
        assert pid is not None
        rss = rss_kib(pid)
        values.append(
            (
                "QEMU RSS, idle warm 512 MB sandbox",
                f"{rss['VmRSS'] / 1024:.0f} MiB",
                "≤ 300 MiB",
            )
        )
        values.append(
            (
                "  of which guest RAM (file pages) / anon",
                f"{rss.get('RssFile', 0) / 1024:.0f} / {rss.get('RssAnon', 0) / 1024:.0f} MiB",
                "",
            )
        )
        await engine.resume(sid)

        stop_ms, restore_exec_ms = [], []
        restore_phases: list[dict[str, float]] = []
        for _ in range(5):
            await asyncio.sleep(1)  # let it idle a moment between cycles
            start = time.perf_counter()
            await engine.stop(sid)
            stop_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            cold = await engine.agent(sid)
            await cold.exec(["true"])
            restore_exec_ms.append((time.perf_counter() - start) * 1000)
            restore_phases.append(engine.last_phases(sid))
        rows.append(Row("stop (snapshot) of an idle 512 MB sandbox", stop_ms, "≤ 1000"))
        rows.append(Row("cold restore → first exec", restore_exec_ms, "≤ 400"))
        values.append(("create phases, p50 ms", phase_summary(create_phases), ""))
        values.append(("restore phases, p50 ms", phase_summary(restore_phases), ""))
        await snapshot_sizes(engine, client, values)
        rows.append(Row("destroy", destroy_ms, "≤ 200"))
    finally:
        for info in engine.list():
            with contextlib.suppress(Exception):
                await engine.destroy(info.sandbox_id)
        await engine.close()
    print_table("QEMU engine (TCG)", rows)
    print_values("QEMU engine: memory and snapshots", values)


async def snapshot_sizes(
    engine: QemuEngine, client: AgentClient, values: list[tuple[str, str, str]]
) -> None:
    """A fresh sandbox: first stop (full) vs the next two (diff), bytes the sync wrote."""
    sid = "snap"
    await engine.create(SandboxSpec(sandbox_id=sid, name=sid, memory_mb=512))
    snap_client = await engine.agent(sid)
    for i in range(3):
        await snap_client.exec(["sh", "-c", f"head -c 8M /dev/urandom > /tmp/blob{i}"])
        await engine.stop(sid)
        last = engine.snapshot_info(sid).last
        assert last is not None
        written = "?" if last.ram_written_bytes is None else f"{last.ram_written_bytes / MIB:.1f}"
        values.append(
            (
                f"stop {i + 1} ({last.kind}): time / RAM written",
                f"{last.total_ms:.0f} ms / {written} MiB",
                "",
            )
        )
        values.append(
            (
                f"stop {i + 1} ({last.kind}): device state / RAM file",
                f"{last.state_bytes / 1024:.0f} KiB / {last.ram_allocated_bytes / MIB:.0f} MiB",
                "",
            )
        )
        await engine.start(sid)
    check = await snap_client.exec(["sh", "-c", "ls /tmp/blob0 /tmp/blob1 /tmp/blob2"])
    assert check.exit_code == 0, check
    await engine.destroy(sid)


def main() -> None:
    with engine_scratch("engine") as (data_dir, netns):
        asyncio.run(run(data_dir, netns))


if __name__ == "__main__":
    main()
