"""Density: proportional memory (PSS) of idle warm sandboxes of one shape (real microVMs).

    .venv/bin/python -m bench density

Creates SANDBOXES sandboxes of the default shape (512 MB) from one template, runs
an exec in each, pauses them (warm) and reads every QEMU's ``smaps``: its PSS in
all and split into guest RAM, TCG's translated-code cache and the rest of QEMU;
again after two cold cycles each. Twice: with the default (each clone's RAM a
copy of the template's: the reference) and with ``shared_template_ram``, where
clones map the template's RAM copy-on-write, so the guest pages they never wrote
are one page cache shared by all of them. The timing rows show what the sharing
costs: a clone's first stop streams its whole RAM and moves it into a RAM file
of its own (see ``ThermalControl._settle``).
Runs in a network namespace of its own with a temporary data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.engine import SandboxSpec
from kiln.engine.qemu import QemuConfig, QemuEngine
from kiln.network import NetworkConfig

from ._harness import engine_scratch
from ._stats import Row, print_table
from .bench_engine import skip_reason as _engine_skip_reason

REQUIRES: str | None = "root, qemu-system-x86_64, a kiln image (built on first use, ~1 min)"

SANDBOXES = 10
IDLE_S = 3.0
_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$")


def skip_reason() -> str | None:
    return _engine_skip_reason()


@dataclass(frozen=True)
class Pss:
    """One QEMU's proportional set size, in MiB, split by what the pages hold."""

    total: float
    guest_ram: float
    code_cache: float

    @property
    def rest(self) -> float:
        return self.total - self.guest_ram - self.code_cache


def read_pss(pid: int) -> Pss:
    total = ram = code = 0
    kind = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        match = _MAPPING.match(line)
        if match:
            perms, name = match.groups()
            # Guest RAM is the one mapping of a file named "ram" (the template's or the
            # sandbox's own); TCG's code buffer is QEMU's one anonymous rwx mapping.
            anonymous_rwx = perms.startswith("rwx") and not name
            kind = "ram" if name.endswith("/ram") else "code" if anonymous_rwx else ""
        elif line.startswith("Pss:"):
            kib = int(line.split()[1])
            total += kib
            ram += kib if kind == "ram" else 0
            code += kib if kind == "code" else 0
    return Pss(total / 1024, ram / 1024, code / 1024)


def pss_rows(label: str, samples: list[Pss], target: str = "") -> list[Row]:
    return [
        Row(f"{label}: PSS per sandbox", [s.total for s in samples], target),
        Row("  guest RAM", [s.guest_ram for s in samples]),
        Row("  TCG code cache", [s.code_cache for s in samples]),
        Row("  rest of QEMU", [s.rest for s in samples]),
    ]


async def idle_pss(engine: QemuEngine, sids: list[str]) -> list[Pss]:
    for sid in sids:
        await (await engine.agent(sid)).exec(["true"])
        await engine.pause(sid)
    await asyncio.sleep(IDLE_S)
    out = []
    for sid in sids:
        pid = engine.pid(sid)
        assert pid is not None, sid
        out.append(read_pss(pid))
    return out


async def one_mode(
    data_dir: Path, netns: str, shared: bool, memory: list[Row], timing: list[Row]
) -> None:
    """SANDBOXES clones with ``shared_template_ram`` as given: idle PSS, then two
    cold cycles each (the first stop, a later one) and idle PSS again."""
    config = QemuConfig(
        data_dir=data_dir,
        network=NetworkConfig(bridge="kb-br1", subnet="10.213.10.0/24", netns=netns, nat=False),
        shared_template_ram=shared,
    )
    engine = QemuEngine(config)
    mode = "shared template RAM" if shared else "reference: RAM copied"
    sids = [f"d{i}" for i in range(SANDBOXES)]
    try:
        await engine.prepare(SandboxSpec(sandbox_id="prep", name="prep"))
        for sid in sids:
            await engine.create(SandboxSpec(sandbox_id=sid, name=sid))
        memory += pss_rows(f"{mode}, new", await idle_pss(engine, sids))
        first_stop, first_restore, later_stop, later_restore = [], [], [], []
        for stops, restores in ((first_stop, first_restore), (later_stop, later_restore)):
            for sid in sids:
                start = time.perf_counter()
                await engine.stop(sid)
                stops.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                await (await engine.agent(sid)).exec(["true"])
                restores.append((time.perf_counter() - start) * 1000)
        memory += pss_rows(f"{mode}, after cold cycles", await idle_pss(engine, sids))
        timing += [
            Row(f"{mode}: first stop", first_stop),
            Row("  then cold restore → first exec", first_restore),
            Row(f"{mode}: a later stop", later_stop),
            Row("  then cold restore → first exec", later_restore),
        ]
    finally:
        for info in engine.list():
            with contextlib.suppress(Exception):
                await engine.destroy(info.sandbox_id)
        await engine.close()


async def run(data_dir: Path, netns: str) -> None:
    memory: list[Row] = []
    timing: list[Row] = []
    for shared in (False, True):  # one template, built by the first
        await one_mode(data_dir, netns, shared, memory, timing)
    print_table(f"Idle warm sandboxes, 512 MB shape, {SANDBOXES} up (TCG)", memory, unit="MiB")
    print_table("What shared template RAM costs a stop", timing)


def main() -> None:
    with engine_scratch("density") as (data_dir, netns):
        asyncio.run(run(data_dir, netns))


if __name__ == "__main__":
    main()
