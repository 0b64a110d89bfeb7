"""Fork of a running QEMU sandbox vs a cold restore (real microVMs, TCG on the dev hosts).

    .venv/bin/python -m bench fork

Runs in a network namespace of its own (``kb-<random>``, deleted at the end) with a
temporary data directory. One 512 MB source runs a Python process; each round forks
it (hot: the source is paused for the copy) and runs ``true`` in the copy, then
destroys the copy. The reference row, measured in the same run on the same source:
stop it and time restore → first exec. Target (issue 16): fork → first exec ≤ cold
restore → first exec. Also: how long the source stood still, and a fork of a cold
source (its snapshot files are copied; the source is not touched).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from kiln.engine import SandboxSpec
from kiln.engine.qemu import QemuConfig, QemuEngine
from kiln.network import NetworkConfig

from ._harness import engine_scratch
from ._stats import Row, phase_medians, print_table, print_values
from .bench_engine import skip_reason as _engine_skip_reason

REQUIRES: str | None = "root, qemu-system-x86_64, a kiln image (built on first use, ~1 min)"

ROUNDS = 8


def skip_reason() -> str | None:
    return _engine_skip_reason()


async def run(data_dir: Path, netns: str) -> None:
    config = QemuConfig(
        data_dir=data_dir,
        network=NetworkConfig(bridge="kb-br1", subnet="10.213.11.0/24", netns=netns, nat=False),
    )
    engine = QemuEngine(config)
    rows: list[Row] = []
    values: list[tuple[str, str, str]] = []
    try:
        src = "src"
        await engine.create(SandboxSpec(sandbox_id=src, name=src, memory_mb=512))
        client = await engine.agent(src)
        busy = "import time\nwhile True:\n    time.sleep(0.5)\n"
        await client.write_file("/tmp/busy.py", busy.encode())
        await client.exec(["sh", "-c", "setsid nohup python3 /tmp/busy.py >/dev/null 2>&1 &"])

        fork_ms, pause_ms, cold_fork_ms, restore_ms = [], [], [], []
        phases: list[dict[str, float]] = []
        for i in range(ROUNDS):
            await engine.ensure_hot(src)
            await asyncio.sleep(0.5)
            start = time.perf_counter()
            await engine.fork(src, SandboxSpec(sandbox_id=f"f{i}", name=f"f{i}", memory_mb=512))
            copy = await engine.agent(f"f{i}")
            await copy.exec(["true"])
            fork_ms.append((time.perf_counter() - start) * 1000)
            phases.append(engine.last_phases(f"f{i}"))
            pause_ms.append(engine.last_fork_pause_ms or 0.0)
            await engine.destroy(f"f{i}")

            # The reference: the same source, stopped, then restored to a first exec.
            await engine.stop(src)
            start = time.perf_counter()
            await engine.fork(src, SandboxSpec(sandbox_id=f"g{i}", name=f"g{i}", memory_mb=512))
            copy = await engine.agent(f"g{i}")
            await copy.exec(["true"])
            cold_fork_ms.append((time.perf_counter() - start) * 1000)
            await engine.destroy(f"g{i}")
            start = time.perf_counter()
            cold = await engine.agent(src)
            await cold.exec(["true"])
            restore_ms.append((time.perf_counter() - start) * 1000)

        rows.append(Row("cold restore → first exec (reference)", restore_ms, ""))
        rows.append(Row("fork (hot source) → first exec in the copy", fork_ms, "≤ reference"))
        rows.append(Row("fork (cold source) → first exec in the copy", cold_fork_ms, ""))
        rows.append(Row("hot source paused by the fork", pause_ms, "brief"))
        values.append(("fork phases, p50 ms", phase_medians(phases), ""))
    finally:
        for info in engine.list():
            with contextlib.suppress(Exception):
                await engine.destroy(info.sandbox_id)
        await engine.close()
    print_table("QEMU fork (TCG, 512 MB)", rows)
    print_values("QEMU fork: where the time goes", values)


def main() -> None:
    with engine_scratch("fork") as (data_dir, netns):
        asyncio.run(run(data_dir, netns))


if __name__ == "__main__":
    main()
