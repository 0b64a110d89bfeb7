"""Create from a saved image vs create from the default template (real QEMU microVMs,
TCG on the dev hosts).

    .venv/bin/python -m bench save

Runs in a network namespace of its own (``kb-<random>``, deleted at the end) with a
temporary data directory. A 512 MB source of the default shape runs a background
HTTP server and is saved once (its disk, RAM and device state; the save's time and
the source's pause are reported too). Each round then creates one sandbox from the
saved image and one from the default template, alternately, and times create → the
first ``exec true`` answered; each is destroyed before the next. The reference row is
the template create, measured in the same run. Target (issue 18): from a saved image
≤ 1.2 x the template create.
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

ROUNDS = 10
MEMORY_MB = 512


def skip_reason() -> str | None:
    return _engine_skip_reason()


async def _first_exec(engine: QemuEngine, spec: SandboxSpec) -> float:
    """Milliseconds from create to the first ``true`` answered."""
    start = time.perf_counter()
    await engine.create(spec)
    client = await engine.agent(spec.sandbox_id)
    result = await client.exec(["true"])
    elapsed = (time.perf_counter() - start) * 1000
    assert result.exit_code == 0, result
    return elapsed


async def run(data_dir: Path, netns: str) -> None:
    config = QemuConfig(
        data_dir=data_dir,
        network=NetworkConfig(bridge="kb-br2", subnet="10.213.12.0/24", netns=netns, nat=False),
    )
    engine = QemuEngine(config)
    rows: list[Row] = []
    values: list[tuple[str, str, str]] = []
    try:
        src = "src"
        await engine.create(SandboxSpec(sandbox_id=src, name=src, memory_mb=MEMORY_MB))
        client = await engine.agent(src)
        await client.start_process(["python3", "-m", "http.server", "--bind", "127.0.0.1", "8000"])
        await asyncio.sleep(1.0)
        start = time.perf_counter()
        saved = await engine.save_image(src, "bench-image")
        save_ms = (time.perf_counter() - start) * 1000
        pause_ms = engine.last_fork_pause_ms or 0.0
        await engine.destroy(src)
        from_saved = SandboxSpec(sandbox_id="x", name="x", **saved.spec_fields())

        saved_ms, template_ms = [], []
        saved_phases: list[dict[str, float]] = []
        for i in range(ROUNDS):
            sid = f"s{i}"
            spec = SandboxSpec(**{**from_saved.to_json(), "sandbox_id": sid, "name": sid})
            saved_ms.append(await _first_exec(engine, spec))
            saved_phases.append(engine.last_phases(sid))
            # The server the saved sandbox ran is running in this one.
            probe = await (await engine.agent(sid)).exec(
                ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/')"]
            )
            assert probe.exit_code == 0, probe
            await engine.destroy(sid)

            tid = f"t{i}"
            template_ms.append(
                await _first_exec(
                    engine, SandboxSpec(sandbox_id=tid, name=tid, memory_mb=MEMORY_MB)
                )
            )
            await engine.destroy(tid)

        rows.append(Row("create from the default template → first exec (reference)", template_ms))
        rows.append(Row("create from a saved image → first exec", saved_ms, "≤ 1.2 x reference"))
        ratio = sorted(saved_ms)[len(saved_ms) // 2] / sorted(template_ms)[len(template_ms) // 2]
        values.append(("saved / template, p50", f"{ratio:.2f}x", "≤ 1.2x"))
        values.append(("save (hot 512 MB source, server running)", f"{save_ms:.0f} ms", ""))
        values.append(("… of which the source stood still", f"{pause_ms:.0f} ms", "brief"))
        values.append(("saved image on disk", f"{saved.size_bytes / 2**20:.0f} MiB", ""))
        values.append(("create-from-saved phases, p50 ms", phase_medians(saved_phases), ""))
    finally:
        for info in engine.list():
            with contextlib.suppress(Exception):
                await engine.destroy(info.sandbox_id)
        with contextlib.suppress(Exception):
            await engine.delete_saved_image("bench-image")
        await engine.close()
    print_table(f"QEMU create from a saved image (TCG, {MEMORY_MB} MB)", rows)
    print_values("QEMU save: the rest", values)


def main() -> None:
    with engine_scratch("save") as (data_dir, netns):
        asyncio.run(run(data_dir, netns))


if __name__ == "__main__":
    main()
