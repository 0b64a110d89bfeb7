"""What the sandbox firewall costs: rule updates, and exec and create with it on and off.

    scripts/bench firewall          (python -m bench firewall, in a netns)

1. Rule updates (no sandboxes needed): ``Firewall.admit`` of one more sandbox
   and ``release`` of it, with 0 / 10 / 100 / 250 sandboxes already admitted, in
   a namespace of its own. Reference: ``nft -f`` of an empty table pair, the
   fixed price of running nft at all.
2. Exec and create with and without it, same run, same private dockerd: two
   Docker engines (runc) on two bridges of one namespace, one admitted to a
   firewall holding 100 other sandboxes, one with no firewall at all, taking turns
   iteration by iteration. Exec ``true`` (host → agent over the bridge, the path
   a rule would slow) and create → first exec done (the rules are written while
   the container is made: only what is left of it counts). The engine without a
   firewall is the reference: the target is "no measurable difference".

Skipped without root, nft, or what the Docker engine needs. About a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import tempfile
import time
from pathlib import Path

from kiln.engine import SandboxSpec
from kiln.engine.docker.engine import DockerEngine
from kiln.engine.docker.testing import engine_config, private_dockerd
from kiln.network import ToolMissing, ensure_netns
from kiln.network.firewall import Firewall, FirewallConfig, Member, Nft, removal
from kiln.network.policy import NetworkPolicy

from ._stats import Row, print_table
from .bench_docker_engine import skip_reason as docker_skip_reason

REQUIRES: str | None = "root, nftables; for part 2 docker.io and kiln's base rootfs"

SIZES = (0, 10, 100, 250)
UPDATES = 30
EXECS = 60
CREATES = 8
OTHERS = 100


def skip_reason() -> str | None:
    try:
        Nft.require()
    except ToolMissing as exc:
        return str(exc)
    return None


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def fake_members(n: int, *, start: int = 0) -> list[Member]:
    policies = (NetworkPolicy(), NetworkPolicy("deny", allow=("203.0.113.0/24",)))
    return [
        Member(
            f"m{i}",
            f"10.{100 + i // 250}.{i % 250}.2",
            f"user{i % 7}",
            policies[i % 2],
            port=f"ktap{i:04x}",
            mac=f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
        )
        for i in range(start, start + n)
    ]


def rule_updates(ns: str) -> list[Row]:
    rows = []
    nft = Nft(ns)
    table = "kiln_bench"
    empty = f"table inet {table} {{}}\ntable bridge {table} {{}}\n"
    samples = []
    for _ in range(UPDATES):
        start = time.perf_counter()
        nft.apply(empty)
        samples.append(ms_since(start))
    nft.apply(removal(table))
    rows.append(Row("reference: nft -f of two empty tables", samples))
    for size in SIZES:
        firewall = Firewall(FirewallConfig(table=table, bridges=("kb0", "kb1"), netns=ns))
        firewall.setup()
        for m in fake_members(size):
            firewall.admit(m)
        admits, releases = [], []
        for member in fake_members(UPDATES, start=1000):
            start = time.perf_counter()
            firewall.admit(member)
            admits.append(ms_since(start))
            start = time.perf_counter()
            firewall.release(member.sandbox_id)
            releases.append(ms_since(start))
        firewall.teardown()
        rows.append(Row(f"admit one sandbox, {size} admitted", admits))
        rows.append(Row(f"release one sandbox, {size} admitted", releases))
    return rows


async def engines_part(root: Path) -> list[Row]:
    with private_dockerd(root / "dockerd") as dockerd:
        ns = dockerd.config.netns
        assert ns is not None
        firewall = Firewall(FirewallConfig(table="kiln_bench", bridges=("kfw-on",), netns=ns))
        firewall.setup()
        for m in fake_members(OTHERS):
            firewall.admit(m)
        on = DockerEngine(
            engine_config(root / "on", dockerd, bridge="kfw-on", subnet="10.213.64.0/24"),
            firewall,
        )
        off = DockerEngine(
            engine_config(root / "off", dockerd, bridge="kfw-off", subnet="10.213.65.0/24")
        )
        samples: dict[str, list[float]] = {}
        try:
            for engine in (on, off):
                await engine.prepare(SandboxSpec(sandbox_id="prep", name="prep"))
            sids = {}
            for i in range(CREATES + 1):
                for label, engine in (
                    (("on", on), ("off", off)) if i % 2 else (("off", off), ("on", on))
                ):
                    sid = f"b{label}-{secrets.token_hex(3)}"
                    start = time.perf_counter()
                    await engine.create(SandboxSpec(sandbox_id=sid, name=sid, owner="bench"))
                    result = await (await engine.agent(sid)).exec(["true"])
                    assert result.exit_code == 0
                    if i:  # the first of each is a warm-up
                        samples.setdefault(f"create → first exec, {label}", []).append(
                            ms_since(start)
                        )
                    old = sids.get(label)
                    if old is not None:
                        await engine.destroy(old)
                    sids[label] = sid
            for i in range(EXECS + 5):
                for label, engine in (
                    (("on", on), ("off", off)) if i % 2 else (("off", off), ("on", on))
                ):
                    agent = await engine.agent(sids[label])
                    start = time.perf_counter()
                    result = await agent.exec(["true"])
                    took = ms_since(start)
                    assert result.exit_code == 0
                    if i >= 5:
                        samples.setdefault(f"exec true, {label}", []).append(took)
        finally:
            for engine in (on, off):
                for info in engine.list():
                    with contextlib.suppress(Exception):
                        await engine.destroy(info.sandbox_id)
                await engine.close()
            firewall.teardown()
    names = {
        "exec true, off": "reference: exec true, no firewall",
        "exec true, on": f"exec true, firewall with {OTHERS} others",
        "create → first exec, off": "reference: create → first exec, no firewall",
        "create → first exec, on": f"create → first exec, firewall with {OTHERS} others",
    }
    return [Row(label, samples.get(key, [])) for key, label in names.items()]


def main() -> None:
    ns = f"kfwb-{secrets.token_hex(3)}"
    ensure_netns(ns)
    try:
        rows = rule_updates(ns)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    print_table("firewall rule updates (one nft transaction each)", rows)
    reason = docker_skip_reason()
    if reason is not None:
        print(f"\nexec/create with and without the firewall: skipped: {reason}")
        return
    with tempfile.TemporaryDirectory(prefix="kiln-bench-fw-") as tmp:
        rows = asyncio.run(engines_part(Path(tmp)))
    print_table("Docker engine (runc) with and without the firewall", rows)
    for what in ("exec true", "create → first exec"):
        with_fw = next(r for r in rows if r.name.startswith(what))
        ref = next(r for r in rows if r.name == f"reference: {what}, no firewall")
        print(f"- {what}: with/without at p50 = {with_fw.pct(50) / ref.pct(50):.2f}")
