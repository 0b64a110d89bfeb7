"""kiln's Docker engine against plain Docker: one run, one private dockerd, one image.

    scripts/bench docker_engine        (python -m bench docker_engine, in a netns)

A private dockerd (``kiln.engine.docker.testing.private_dockerd``, a network
namespace of its own) gets kiln's rootfs imported once by
``images.ensure_image``; a :class:`~kiln.engine.docker.engine.DockerEngine` on
that dockerd (its own bridge) makes kiln's sandboxes, and plain containers of
the *same image* (``sleep infinity``, Engine API through the docker SDK) are the
reference. Kiln and plain Docker take turns going first, iteration by
iteration, so a change in host load hits both alike. Per runtime (runc, runsc),
against the targets of the Docker-engine issue (verdicts on p50, kiln/reference):

1. exec ``true``, warm: kiln's agent exec over TCP must *beat* ``docker exec``
   (Engine API create+start+inspect, the same without inspect, and Debian's
   20.10 CLI ``/usr/bin/docker exec`` with ``DOCKER_HOST`` set); components
   (TCP connect, a no-spawn agent round trip, exec as root, python3 start);
2. create → first exec done: ``engine.create`` + ``exec true`` ≤ 1.2 x ``docker
   run -d`` (create + start) + ``exec true``. The docker SDK calls inside kiln's
   create are timed (their methods wrapped on the engine's client), the agent's
   start is read from the container's ``StartedAt``, and a third container
   (plain, on kiln's Docker network) prices dockerd's user-defined network (runsc
   sandboxes are on it; runc ones have ``--network none`` and kiln's veth); the
   first exec after create is the cold exec;
3. pause, resume (with kiln's own share beside the SDK call), and pause →
   ``engine.agent`` (which resumes) + exec, each ≤ plain ``pause`` / ``unpause``
   / ``unpause`` + exec. dockerd 20.10 updates its paused state from
   containerd's events, after answering: a call right after may be refused
   ("is not paused", "is paused"); both sides retry (counted, time included);
4. idle memory (PSS: container cgroup, + shim and runsc's gofer), kiln's sandbox
   against a plain ``sleep`` container, IDLE of each up at once;
5. CPU: ``python3 -c 'sum(range(3*10**6))'`` on the host, in kiln's runc and runsc
   sandboxes and in a QEMU sandbox (TCG here; its own namespace, as bench_engine;
   skipped with the reason when QEMU cannot run): wall time of the exec and the
   loop's own time, p50 and the slowdown against the host.

Skipped when no private dockerd can run or kiln's base rootfs is missing (``python
-m kiln.images ensure``). Everything (sandboxes, containers, dockerd, namespaces,
VMs) is removed at the end, also on failure. 2.5-3 minutes on a 2-core dev host,
of which the image import takes 7-17 s. Results: docs/docker-notes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker.errors

from kiln.agent_client import CONTROL_PORT
from kiln.engine import EngineError, SandboxSpec
from kiln.engine.docker import Dockerd
from kiln.engine.docker import images as docker_images
from kiln.engine.docker.engine import DockerEngine
from kiln.engine.docker.host import cmdline
from kiln.engine.docker.testing import engine_config, private_dockerd, unavailable_reason
from kiln.network import close_dialer, connect_in

from ._stats import Row
from .bench_docker import container_pids, exec_true, pss_kib
from .bench_engine import skip_reason as qemu_skip_reason

REQUIRES: str | None = (
    "root, docker.io and runsc (Debian), kiln's base rootfs; QEMU for one row (optional)"
)

RUNTIMES = ("runc", "runsc")
CREATES = 8  # create → first exec, per runtime and side (after one warm-up each)
EXECS = 40  # exec true per variant, after WARMUP
CLI_EXECS = 12  # docker CLI exec (a process each, ~0.1 s)
PAUSES = 40  # pause/resume cycles, then as many pause → exec cycles
IDLE = 3  # idle sandboxes of each side up at once for PSS
CPU_RUNS = 15  # python3 loop per place (Docker runtimes and host); the host is noisy
QEMU_CPU_RUNS = 6  # under TCG each takes ~0.5 s
WARMUP = 3
LIMIT_CREATE = 1.2
BRIDGE = "kd-bde0"
SUBNET = "10.213.62.0/24"
SPARE_IP = "10.213.62.250"  # on kiln's bridge for a plain container; kiln's pool starts low
QEMU_BRIDGE = "kb-bde1"
QEMU_SUBNET = "10.213.63.0/24"
HOST_PYTHON = "/usr/bin/python3"  # Debian's, the same 3.11 as the image's
CPU_LOOP = "sum(range(3*10**6))"
CPU_SCRIPT = (
    f"import time; t = time.perf_counter(); {CPU_LOOP}; print((time.perf_counter() - t) * 1000)"
)
#: What a container's agent imports before it answers (as its zipapp does: no ssl).
AGENT_IMPORT = (
    "import sys, time; t = time.perf_counter();"
    " sys.modules.update(dict.fromkeys(('ssl', '_ssl', '_hashlib')));"
    f" sys.path.insert(0, {docker_images.AGENT_PATH!r});"
    " import kiln.guest.__main__, kiln.guest.agent, kiln.guest.container, kiln.guest.config;"
    " print((time.perf_counter() - t) * 1000)"
)
CLI = "/usr/bin/docker"  # Debian's 20.10 client; /usr/local/bin/docker (28.x) shadows it


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Ref:
    """A reference row; with ``limit``, kiln's p50 must be ≤ limit x its p50 (< if strict)."""

    row: Row
    limit: float | None = None
    strict: bool = False

    def target(self) -> str:
        if self.limit is None:
            return ""
        if self.strict:
            return "kiln < ref" if self.limit == 1 else f"kiln < {self.limit:g}x ref"
        return "kiln ≤ ref" if self.limit == 1 else f"kiln ≤ {self.limit:g}x ref"

    def met(self, kiln: Row) -> bool | None:
        if self.limit is None:
            return None
        ratio = kiln.pct(50) / self.row.pct(50)
        return ratio < self.limit if self.strict else ratio <= self.limit


@dataclass(frozen=True)
class Comparison:
    """kiln's row, the reference rows beside it, and component rows (no verdict)."""

    title: str
    kiln: Row
    refs: tuple[Ref, ...]
    parts: tuple[Row, ...] = ()


@dataclass
class Report:
    comparisons: list[Comparison] = field(default_factory=list)
    memory: list[Comparison] = field(default_factory=list)
    #: place → (wall ms, loop ms), in the order first measured; "host" is the reference
    cpu: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    cpu_skipped: list[tuple[str, str]] = field(default_factory=list)
    values: list[tuple[str, str]] = field(default_factory=list)


def format_comparison(c: Comparison, unit: str = "ms") -> list[str]:
    """A table: kiln's row, then each reference with kiln/ref at p50 and the verdict."""
    lines = [
        f"\n### {c.title} ({unit})",
        f"| {'measure':<50} | {'n':>3} | {'p50':>8} | {'p95':>8} | {'p99':>8}"
        f" | {'kiln/ref':>8} | {'target':<14} | verdict",
        "|" + "-" * 52 + "|-----|" + "----------|" * 4 + "----------------|--------",
    ]

    def line(name: str, row: Row, ratio: str = "", target: str = "", verdict: str = "") -> str:
        return (
            f"| {name:<50} | {len(row.samples_ms):>3} | {row.pct(50):>8.1f} |"
            f" {row.pct(95):>8.1f} | {row.pct(99):>8.1f} | {ratio:>8} | {target:<14} | {verdict}"
        )

    lines.append(line(c.kiln.name, c.kiln))
    for ref in c.refs:
        ratio = c.kiln.pct(50) / ref.row.pct(50)
        met = ref.met(c.kiln)
        verdict = "" if met is None else ("MET" if met else "MISSED")
        lines.append(line(ref.row.name, ref.row, f"{ratio:.2f}", ref.target(), verdict))
    for part in c.parts:
        if part.samples_ms:  # a variant this runtime could not run is noted in the values
            lines.append(line(part.name, part))
    return lines


def verdicts(report: Report) -> list[tuple[str, str, float, bool]]:
    """(comparison, reference, kiln/ref at p50, met) for every reference with a target."""
    out = []
    for c in report.comparisons:
        for ref in c.refs:
            met = ref.met(c.kiln)
            if met is not None:
                out.append((c.title, ref.row.name, c.kiln.pct(50) / ref.row.pct(50), met))
    return out


def format_cpu(report: Report) -> list[str]:
    lines = [
        f"\n### CPU: python3 -c '{CPU_LOOP}' (ms; slowdown: p50 against the host's p50)",
        f"| {'place':<34} | {'n':>3} | {'wall p50':>9} | {'wall p95':>9} | {'x host':>7}"
        f" | {'loop p50':>9} | {'loop p95':>9} | {'x host':>7}",
        "|"
        + "-" * 36
        + "|-----|"
        + "-----------|" * 2
        + "---------|"
        + "-----------|" * 2
        + "---------",
    ]
    host_wall, host_loop = (Row("host", xs) for xs in report.cpu.get("host", ([], [])))
    for place, (walls, loops) in report.cpu.items():
        wall, loop = Row(place, walls), Row(place, loops)
        lines.append(
            f"| {place:<34} | {len(walls):>3} | {wall.pct(50):>9.0f} | {wall.pct(95):>9.0f} |"
            f" {wall.pct(50) / host_wall.pct(50):>7.2f} | {loop.pct(50):>9.0f} |"
            f" {loop.pct(95):>9.0f} | {loop.pct(50) / host_loop.pct(50):>7.2f}"
        )
    for place, reason in report.cpu_skipped:
        lines.append(f"| {place:<34} | skipped: {reason}")
    lines.append(
        "(wall: the whole command as its caller sees it, interpreter start included (the"
        " host: a subprocess; sandboxes: the agent's exec); loop: the sum alone, timed inside"
        " python3; the host ran in both the Docker and the QEMU rounds)"
    )
    return lines


def print_report(report: Report) -> None:
    print("\n## kiln's Docker engine vs plain Docker (same dockerd, same image)")
    for c in report.comparisons:
        print("\n".join(format_comparison(c)))
    print("\n## idle memory per sandbox")
    for c in report.memory:
        print("\n".join(format_comparison(c, unit="PSS, MiB")))
    print("\n".join(format_cpu(report)))
    print("\n## targets (p50)")
    for title, ref, ratio, met in verdicts(report):
        print(f"- {'MET   ' if met else 'MISSED'} {title}: kiln/ref {ratio:.2f} against {ref}")
    print("\n## values")
    for name, value in report.values:
        print(f"- {name}: {value}")


# --------------------------------------------------------------------------- measuring


def skip_reason() -> str | None:
    reason = unavailable_reason()
    if reason is not None:
        return reason
    from kiln.images import builder, cache  # noqa: PLC0415

    inputs = builder.resolve_inputs("minimal")
    if inputs is None:
        return "no kiln image inputs (python -m kiln.images ensure)"
    if not (cache.default_image_dir() / "base" / inputs.base_key / "root").is_dir():
        return "kiln's base rootfs is not built (python -m kiln.images ensure, with network)"
    return None


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class Samples:
    """Named sample lists, filled round-robin so that every variant sees the same load."""

    def __init__(self) -> None:
        self.data: dict[str, list[float]] = {}

    def add(self, name: str, ms: float) -> None:
        self.data.setdefault(name, []).append(ms)

    async def time(self, name: str, fn: Callable[[], Awaitable[object]]) -> None:
        start = time.perf_counter()
        await fn()
        self.add(name, ms_since(start))

    def row(self, name: str, label: str | None = None) -> Row:
        return Row(label or name, self.data.get(name, []))


class CallTimer:
    """Times the docker SDK calls the engine makes (its methods wrapped on the client)."""

    METHODS = ("create_container", "start", "inspect_container", "pause", "unpause")

    def __init__(self, api: Any) -> None:
        self._api = api
        self._lock = threading.Lock()
        self.calls: dict[str, float] = {}

    def reset(self) -> dict[str, float]:
        with self._lock:
            calls, self.calls = self.calls, {}
        return calls

    def install(self) -> None:
        for name in self.METHODS:
            setattr(self._api, name, self._wrap(name, getattr(self._api, name)))

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                with self._lock:
                    self.calls[name] = self.calls.get(name, 0.0) + ms_since(start)

        return timed


def run_plain(
    client: Any, image: str, runtime: str, network: tuple[str, str] | None = None
) -> tuple[str, float]:
    """``docker run -d IMAGE sleep infinity`` (create + start, what the CLI's run -d
    costs), on dockerd's default bridge or on ``network`` (name, fixed address);
    (the id, ms of the start call)."""
    api = client.api
    host_config = api.create_host_config(runtime=runtime)
    kw: dict[str, Any] = {}
    if network is not None:
        endpoint = api.create_endpoint_config(ipv4_address=network[1])
        kw["networking_config"] = api.create_networking_config({network[0]: endpoint})
    cid: str = api.create_container(image, ["sleep", "infinity"], host_config=host_config, **kw)[
        "Id"
    ]
    start = time.perf_counter()
    api.start(cid)
    return cid, ms_since(start)


def exec_no_inspect(client: Any, cid: str) -> None:
    exec_id = client.api.exec_create(cid, ["true"])["Id"]
    client.api.exec_start(exec_id)


def docker_time(stamp: str) -> float:
    """Unix seconds of dockerd's RFC 3339 time stamps (UTC, nanoseconds)."""
    head, _, fraction = stamp.rstrip("Z").partition(".")
    whole = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return whole + float(f"0.{fraction or '0'}")


def is_state_race(message: str) -> bool:
    """dockerd refused a pause or unpause because its state lags containerd's."""
    return "is not paused" in message or "is already paused" in message


def exec_plain_retrying(client: Any, cid: str) -> int:
    """exec true right after an unpause; dockerd 20.10 may still say 'paused' (409)."""
    refused = 0
    while True:
        try:
            exec_true(client, cid)
            return refused
        except docker.errors.APIError as exc:
            if "is paused" not in str(exc.explanation):
                raise
            refused += 1


def new_spec(prefix: str, runtime: str) -> SandboxSpec:
    sid = f"{prefix}-{secrets.token_hex(3)}"
    return SandboxSpec(sandbox_id=sid, name=sid, runtime=runtime)


async def kiln_exec(engine: DockerEngine, sid: str, cmd: Sequence[str], **kw: Any) -> bytes:
    result = await (await engine.agent(sid)).exec(list(cmd), **kw)
    assert result.exit_code == 0, result
    return result.stdout


class Bench:
    def __init__(
        self,
        report: Report,
        *,
        dockerd: Dockerd,
        client: Any,
        engine: DockerEngine,
        image: str,
        timer: CallTimer,
    ) -> None:
        self.report = report
        self.timer = timer
        self.dockerd = dockerd
        self.client = client
        self.engine = engine
        self.image = image
        self.plain: list[str] = []  # container ids to remove
        self.cli = Path(CLI).exists()

    def remove_plain(self, cid: str) -> None:
        with contextlib.suppress(docker.errors.APIError):
            self.client.api.unpause(cid)
        self.client.api.remove_container(cid, force=True)
        self.plain.remove(cid)

    def start_plain(self, runtime: str, *, on_kiln_network: bool = False) -> tuple[str, float]:
        """A plain ``sleep`` container, started: (its id, ms of the start call)."""
        network = (self.engine.config.network_name, SPARE_IP) if on_kiln_network else None
        cid, started = run_plain(self.client, self.image, runtime, network)
        self.plain.append(cid)
        return cid, started

    # -- 2. create → first exec --------------------------------------------------------

    async def creates(self, rt: str) -> tuple[str, str]:
        """CREATES kiln creates and plain runs, alternating; one of each is kept.

        A third container per round, plain ``sleep`` again but with kiln's network
        (its bridge, a fixed address), tells dockerd's network cost apart."""
        s = Samples()
        kept: tuple[str, str] = ("", "")
        for i in range(CREATES + 1):
            warm_up = i == 0
            sides = [self._kiln_create(rt, s), self._plain_run(rt, s), self._net_run(rt, s)]
            results = []
            for side in sides[i % 3 :] + sides[: i % 3]:  # each goes first in turn
                results.append(await side)
            sid = next(r for r in results if r[0] == "kiln")[1]
            cid = next(r for r in results if r[0] == "plain")[1]
            start = time.perf_counter()
            await asyncio.to_thread(docker_images.agent_zipapp, self.engine.config.state_dir)
            s.add("zipapp", ms_since(start))
            if warm_up:  # the image's files come into the page cache
                self.report.values.append(
                    (
                        f"{rt}: first create → exec of the run (warm-up, not in the rows)",
                        f"kiln {s.data['total'][0]:.0f} ms,"
                        f" plain {s.data['plain total'][0]:.0f} ms",
                    )
                )
                s.data = {}
            if i == CREATES:
                kept = (sid, cid)
                break
            start = time.perf_counter()
            await self.engine.destroy(sid)
            s.add("destroy", ms_since(start))
            start = time.perf_counter()
            await asyncio.to_thread(self.remove_plain, cid)
            s.add("rm", ms_since(start))
        sid = kept[0]
        agent = await self.engine.agent(sid)
        for _ in range(WARMUP + CREATES):
            result = await agent.exec(["python3", "-c", AGENT_IMPORT])
            assert result.exit_code == 0, result
            s.add("import", float(result.stdout))
        s.data["import"] = s.data["import"][WARMUP:]
        self.report.comparisons.append(
            Comparison(
                f"{rt}: create → first exec true done",
                s.row("total", f"kiln {rt}: engine.create + exec true"),
                (
                    Ref(
                        s.row("plain total", f"docker {rt}: run -d (create+start) + exec true"),
                        LIMIT_CREATE,
                    ),
                ),
                (
                    s.row("create", "  kiln: engine.create (agent answering)"),
                    s.row("create_container", "    of which docker create (kiln's config)"),
                    s.row("start", "    of which docker start"),
                    s.row("inspect_container", "    of which docker inspect"),
                    s.row("rest", "    rest: kiln's steps, waiting for the agent"),
                    s.row("agent start", "    agent: process started → answering (overlaps)"),
                    s.row("import", "      of which python3 importing it (warm sandbox)"),
                    s.row("zipapp", "    kiln's step: agent_zipapp() (alone, same n)"),
                    s.row("first", "  kiln: then first exec true"),
                    s.row("plain run", "  docker: run -d (create+start, sleep infinity)"),
                    s.row("plain start", "    of which docker start"),
                    s.row("net run", "  docker: the same on kiln's network (fixed IP)"),
                    s.row("net start", "    of which docker start"),
                    s.row("plain first", "  docker: then first exec true (Engine API)"),
                ),
            )
        )
        self.report.comparisons.append(
            Comparison(
                f"{rt}: destroy (running sandbox)",
                s.row("destroy", f"kiln {rt}: engine.destroy"),
                (Ref(s.row("rm", f"docker {rt}: (unpause +) rm -f (Engine API)")),),
            )
        )
        return kept

    async def _kiln_create(self, rt: str, s: Samples) -> tuple[str, str]:
        spec = new_spec(f"c{rt}", rt)
        self.timer.reset()
        start = time.perf_counter()
        await self.engine.create(spec)
        created = ms_since(start)
        answering = time.time()
        calls = self.timer.reset()
        t = time.perf_counter()
        await kiln_exec(self.engine, spec.sandbox_id, ["true"])
        s.add("first", ms_since(t))
        s.add("total", ms_since(start))
        s.add("create", created)
        for name, ms in calls.items():
            s.add(name, ms)
        s.add("rest", created - sum(calls.values()))
        state = (await self.engine.inspect(spec.sandbox_id))["State"]
        s.add("agent start", (answering - docker_time(state["StartedAt"])) * 1000)
        return "kiln", spec.sandbox_id

    async def _plain_run(self, rt: str, s: Samples) -> tuple[str, str]:
        start = time.perf_counter()
        cid, started = await asyncio.to_thread(self.start_plain, rt)
        s.add("plain run", ms_since(start))
        s.add("plain start", started)
        t = time.perf_counter()
        await asyncio.to_thread(exec_true, self.client, cid)
        s.add("plain first", ms_since(t))
        s.add("plain total", ms_since(start))
        return "plain", cid

    async def _net_run(self, rt: str, s: Samples) -> tuple[str, str]:
        start = time.perf_counter()
        cid, started = await asyncio.to_thread(self.start_plain, rt, on_kiln_network=True)
        s.add("net run", ms_since(start))
        s.add("net start", started)
        await asyncio.to_thread(self.remove_plain, cid)
        return "net", cid

    # -- 1. exec -----------------------------------------------------------------------

    async def execs(self, rt: str, sid: str, cid: str) -> None:
        info = self.engine.info(sid)
        assert info.ip is not None
        agent = await self.engine.agent(sid)
        ns = self.engine.config.network.netns

        async def connect() -> None:
            sock = await connect_in(ns, info.ip or "", CONTROL_PORT, 5.0)
            sock.close()

        async def run(cmd: list[str], **kw: Any) -> None:
            result = await agent.exec(cmd, **kw)
            assert result.exit_code == 0, result

        variants: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("kiln", lambda: run(["true"])),
            ("kiln agent()", lambda: kiln_exec(self.engine, sid, ["true"])),
        ]
        as_root = await agent.exec(["true"], user="root")
        if as_root.exit_code == 0:
            variants.append(("kiln root", lambda: run(["true"], user="root")))
        else:  # runsc 2022 has no pidfd_open, which the agent's own spawns need
            self.report.values.append(
                (
                    f"{rt}: kiln exec as root fails (the agent needs pidfd_open)",
                    as_root.stderr.decode().strip(),
                )
            )
        variants += [
            ("kiln activity", agent.activity),
            ("connect", connect),
            ("api", lambda: asyncio.to_thread(exec_true, self.client, cid)),
            ("api2", lambda: asyncio.to_thread(exec_no_inspect, self.client, cid)),
            ("kiln py", lambda: run(["python3", "-c", "pass"])),
            ("api py", lambda: asyncio.to_thread(self.plain_python, cid)),
        ]
        s = Samples()
        for i in range(WARMUP + EXECS):
            k = i % len(variants)  # each variant first in turn: no fixed neighbour
            for name, fn in variants[k:] + variants[:k]:
                if i < WARMUP:
                    await fn()
                else:
                    await s.time(name, fn)
        env = {**os.environ, "DOCKER_HOST": self.dockerd.config.url}
        argv = [CLI, "exec", cid, "true"]
        refs = [
            Ref(s.row("api", f"docker {rt}: exec true, Engine API (+inspect)"), 1, strict=True),
            Ref(s.row("api2", f"docker {rt}: exec true, Engine API create+start"), 1, strict=True),
        ]
        if self.cli:
            for i in range(WARMUP + CLI_EXECS):
                start = time.perf_counter()
                await asyncio.to_thread(
                    subprocess.run, argv, env=env, check=True, capture_output=True
                )
                if i >= WARMUP:
                    s.add("cli", ms_since(start))
            refs.append(Ref(s.row("cli", f"docker {rt}: {CLI} exec true (20.10)"), 1, strict=True))
        else:
            self.report.values.append((f"{rt}: docker CLI row", f"skipped: no {CLI}"))
        self.report.comparisons.append(
            Comparison(
                f"{rt}: exec true (warm: after {WARMUP} of each)",
                s.row("kiln", f"kiln {rt}: agent exec true (TCP)"),
                tuple(refs),
                (
                    s.row("kiln agent()", "  kiln: engine.agent(id) + exec true"),
                    s.row("kiln root", "  kiln: exec true as root (no user switch)"),
                    s.row("kiln activity", "  kiln: connect+auth+answer, no spawn"),
                    s.row("connect", "  kiln: TCP connect only (netns dialer)"),
                    s.row("kiln py", "  kiln: exec python3 -c pass"),
                    s.row("api py", "  docker: exec python3 -c pass (Engine API)"),
                ),
            )
        )

    def plain_python(self, cid: str) -> None:
        exec_id = self.client.api.exec_create(cid, ["python3", "-c", "pass"])["Id"]
        self.client.api.exec_start(exec_id)

    # -- 3. pause / resume ---------------------------------------------------------------

    async def pauses(self, rt: str, sid: str, cid: str) -> None:
        """Pause and resume, then pause → first exec; kiln and plain alternate going first.

        dockerd 20.10 flips a container's "paused" state when containerd's event
        arrives, after the API call answered: an unpause right after a pause can be
        refused ("is not paused"), an exec right after an unpause ("is paused"). Both
        sides retry such refusals (counted, time included); kiln's engine does not
        retry them itself, so the bench does it around its calls."""
        s = Samples()
        api = self.client.api
        refused = {"kiln": 0, "plain": 0}

        async def kiln_op(op: Callable[[], Awaitable[object]]) -> None:
            while True:
                try:
                    await op()
                    return
                except EngineError as exc:
                    if not is_state_race(str(exc)):
                        raise
                    refused["kiln"] += 1
                    await asyncio.sleep(0.001)

        def plain_op(op: Callable[[str], object]) -> Callable[[], Awaitable[None]]:
            def retrying() -> None:
                while True:
                    try:
                        op(cid)
                        return
                    except docker.errors.APIError as exc:
                        if not is_state_race(str(exc.explanation)):
                            raise
                        refused["plain"] += 1
                        time.sleep(0.001)

            return lambda: asyncio.to_thread(retrying)

        async def kiln(op: Callable[[str], Awaitable[None]], name: str) -> None:
            self.timer.reset()
            start = time.perf_counter()
            await kiln_op(lambda: op(sid))
            wall = ms_since(start)
            sdk = sum(self.timer.reset().values())
            s.add(f"kiln {name}", wall)
            s.add(f"kiln {name} sdk", sdk)
            s.add(f"kiln {name} own", wall - sdk)

        sides: list[Callable[[], Awaitable[None]]] = [
            lambda: kiln(self.engine.pause, "pause"),
            lambda: kiln(self.engine.resume, "resume"),
            lambda: s.time("pause", plain_op(api.pause)),
            lambda: s.time("unpause", plain_op(api.unpause)),
        ]
        for i in range(PAUSES):
            order = sides if i % 2 == 0 else sides[2:] + sides[:2]  # each side first in turn
            for side in order:
                await side()

        async def kiln_wake() -> None:
            await kiln_op(lambda: self.engine.pause(sid))
            await s.time(
                "kiln wake", lambda: kiln_op(lambda: kiln_exec(self.engine, sid, ["true"]))
            )

        async def plain_wake() -> None:
            await plain_op(api.pause)()
            start = time.perf_counter()
            await plain_op(api.unpause)()
            refused["plain"] += await asyncio.to_thread(exec_plain_retrying, self.client, cid)
            s.add("wake", ms_since(start))

        for i in range(PAUSES):
            for side in (kiln_wake, plain_wake) if i % 2 == 0 else (plain_wake, kiln_wake):
                await side()
        for who, count in refused.items():
            self.report.values.append(
                (
                    f"{rt}: {who}: calls refused by dockerd's late paused state, retried",
                    f"{count} times ({4 * PAUSES} pause/resume calls a side)",
                )
            )
        for kiln_name, ref, what in (
            ("pause", "pause", "pause"),
            ("resume", "unpause", "resume / unpause"),
        ):
            self.report.comparisons.append(
                Comparison(
                    f"{rt}: {what}",
                    s.row(f"kiln {kiln_name}", f"kiln {rt}: engine.{kiln_name}"),
                    (Ref(s.row(ref, f"docker {rt}: {ref} (Engine API)"), 1),),
                    (
                        s.row(f"kiln {kiln_name} sdk", f"  kiln: of which the SDK's {ref} call"),
                        s.row(f"kiln {kiln_name} own", "  kiln: the rest (hop, lock, state)"),
                    ),
                )
            )
        self.report.comparisons.append(
            Comparison(
                f"{rt}: paused → first exec true done",
                s.row("kiln wake", f"kiln {rt}: engine.agent (resumes) + exec true"),
                (Ref(s.row("wake", f"docker {rt}: unpause + exec true (Engine API)"), 1),),
            )
        )

    # -- 4. memory ------------------------------------------------------------------------

    async def memory(self, rt: str) -> None:
        """IDLE kiln sandboxes and IDLE plain ``sleep`` containers of ``rt``, all up."""
        sids = []
        for _ in range(IDLE):
            spec = new_spec(f"m{rt}", rt)
            await self.engine.create(spec)
            sids.append(spec.sandbox_id)
        cids = [(await asyncio.to_thread(self.start_plain, rt))[0] for _ in range(IDLE)]
        await asyncio.sleep(2)  # let the runtimes settle
        kiln_ids = [(await self.engine.inspect(sid))["Id"] for sid in sids]
        own: dict[str, list[float]] = {"kiln": [], "plain": []}
        total: dict[str, list[float]] = {"kiln": [], "plain": []}
        names: dict[str, str] = {}
        for side, ids in (("kiln", kiln_ids), ("plain", cids)):
            for container_id in ids:
                tasks, helpers = container_pids(self.dockerd, container_id)
                own_kib = sum(pss_kib(p) for p in tasks)
                helper_kib = sum(pss_kib(p) for p in helpers)
                own[side].append(own_kib / 1024)
                total[side].append((own_kib + helper_kib) / 1024)
                names[side] = ", ".join(sorted({process_name(p) for p in tasks + helpers}))
        for sid in sids:
            await self.engine.destroy(sid)
        for container_id in cids:
            await asyncio.to_thread(self.remove_plain, container_id)
        self.report.memory.append(
            Comparison(
                f"{rt}: idle PSS per sandbox, {IDLE} + {IDLE} up",
                Row(f"kiln {rt}: container cgroup + shim (+ gofer)", total["kiln"]),
                (
                    Ref(
                        Row(
                            f"docker {rt} (sleep): container cgroup + shim (+ gofer)",
                            total["plain"],
                        )
                    ),
                ),
                (
                    Row("  kiln: container cgroup only", own["kiln"]),
                    Row("  docker: container cgroup only", own["plain"]),
                ),
            )
        )
        for side in ("kiln", "plain"):
            self.report.values.append((f"{rt}: processes per idle {side} sandbox", names[side]))

    # -- 5. CPU ------------------------------------------------------------------------------

    async def cpu(self, sandboxes: dict[str, str]) -> None:
        """The loop on the host and in each runtime's sandbox, round by round."""
        places: list[tuple[str, Callable[[], Awaitable[bytes]]]] = [
            ("host", host_python),
            *(
                (f"kiln Docker {rt} (agent exec)", self._cpu_in(sid))
                for rt, sid in sandboxes.items()
            ),
        ]
        await cpu_rounds(self.report, places, CPU_RUNS)

    def _cpu_in(self, sid: str) -> Callable[[], Awaitable[bytes]]:
        return lambda: kiln_exec(self.engine, sid, ["python3", "-c", CPU_SCRIPT])


def process_name(pid: int) -> str:
    """argv[0]'s base name, or the kernel's name for a process without a command line."""
    argv = cmdline(pid)
    if argv:
        return argv[0].rsplit("/", 1)[-1]
    try:
        return f"[{Path(f'/proc/{pid}/comm').read_text().strip()}]"
    except OSError:
        return "?"


async def host_python() -> bytes:
    def run() -> bytes:
        argv = [HOST_PYTHON, "-c", CPU_SCRIPT]
        return subprocess.run(argv, check=True, capture_output=True).stdout

    return await asyncio.to_thread(run)


async def cpu_rounds(
    report: Report, places: Sequence[tuple[str, Callable[[], Awaitable[bytes]]]], runs: int
) -> None:
    """``runs`` rounds over ``places`` after one warm-up round; (wall, loop) ms per place."""
    for i in range(1 + runs):
        for place, fn in places:
            start = time.perf_counter()
            out = await fn()
            wall = ms_since(start)
            if i == 0:
                continue
            samples = report.cpu.setdefault(place, ([], []))
            samples[0].append(wall)
            samples[1].append(float(out.decode()))


# --------------------------------------------------------------------------- the run


async def docker_part(report: Report, root: Path) -> None:
    with (
        private_dockerd(root / "dockerd") as dockerd,
        contextlib.closing(dockerd.client(timeout=600)) as client,
    ):
        start = time.perf_counter()
        image = await asyncio.to_thread(docker_images.ensure_image, client, "minimal")
        report.values.append(
            (f"ensure_image: import of kiln's rootfs as {image}", f"{ms_since(start):.0f} ms")
        )
        report.values.append(
            (
                "dockerd; runsc through the wrapper",
                f"{dockerd.info.version}; {'yes' if dockerd.runsc_wrapped else 'no'}",
            )
        )
        engine = DockerEngine(engine_config(root / "state", dockerd, bridge=BRIDGE, subnet=SUBNET))
        try:
            timer = CallTimer((await engine.docker_client()).api)
            timer.install()  # on the engine's own client, closed with the engine
            bench = Bench(
                report, dockerd=dockerd, client=client, engine=engine, image=image, timer=timer
            )
            runtimes = [rt for rt in RUNTIMES if rt in engine.runtimes]
            for rt in RUNTIMES:
                if rt not in runtimes:
                    report.cpu_skipped.append((f"kiln Docker {rt}", "not registered in dockerd"))
            await engine.prepare(new_spec("prep", "runc"))  # the agent zipapp, the image
            kept: dict[str, str] = {}
            for rt in runtimes:
                sid, cid = await bench.creates(rt)
                kept[rt] = sid
                await bench.execs(rt, sid, cid)
                await bench.pauses(rt, sid, cid)
            await bench.cpu(kept)
            for sid in kept.values():
                await engine.destroy(sid)
            for cid in list(bench.plain):
                await asyncio.to_thread(bench.remove_plain, cid)
            for rt in runtimes:
                await bench.memory(rt)
        finally:
            for info in engine.list():
                with contextlib.suppress(Exception):
                    await engine.destroy(info.sandbox_id)
            await engine.close()
            # private_dockerd kills what is left (plain containers too) and stops dockerd


async def qemu_part(report: Report, data_dir: Path, netns: str) -> None:
    from kiln.engine.qemu import QemuConfig, QemuEngine  # noqa: PLC0415
    from kiln.network import NetworkConfig  # noqa: PLC0415

    network = NetworkConfig(bridge=QEMU_BRIDGE, subnet=QEMU_SUBNET, netns=netns, nat=False)
    engine = QemuEngine(QemuConfig(data_dir=data_dir, network=network))
    spec = SandboxSpec(sandbox_id="cpu", name="cpu")
    try:
        start = time.perf_counter()
        await engine.prepare(spec)
        template = ms_since(start)
        start = time.perf_counter()
        await engine.create(spec)
        accel = engine.accel
        report.values.append(
            (
                "QEMU: template build, then create (from it)",
                f"{template:.0f} ms, {ms_since(start):.0f} ms;"
                f" accel {accel.accel if accel else '?'}",
            )
        )
        agent = await engine.agent(spec.sandbox_id)

        async def in_vm() -> bytes:
            result = await agent.exec(["python3", "-c", CPU_SCRIPT])
            assert result.exit_code == 0, result
            return result.stdout

        await cpu_rounds(
            report, [("host", host_python), ("kiln QEMU (agent exec)", in_vm)], QEMU_CPU_RUNS
        )
    finally:
        for info in engine.list():
            with contextlib.suppress(Exception):
                await engine.destroy(info.sandbox_id)
        await engine.close()


def run_qemu(report: Report) -> None:
    from kiln.engine.qemu.process import find_processes  # noqa: PLC0415

    netns = f"kb-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    data_dir = Path(tempfile.mkdtemp(prefix="kiln-bench-dengine-qemu-"))
    try:
        asyncio.run(qemu_part(report, data_dir, netns))
    finally:
        for pid in find_processes(f"{data_dir}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(data_dir, ignore_errors=True)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> None:
    print(
        f"iterations: creates {CREATES} (+1 warm-up), execs {EXECS} (+{WARMUP}),"
        f" CLI execs {CLI_EXECS} (+{WARMUP}), pause cycles {PAUSES} (+{PAUSES} pause → exec),"
        f" idle {IDLE} + {IDLE}, CPU runs {CPU_RUNS} (QEMU {QEMU_CPU_RUNS}) (+1 warm-up);"
        f" load average {load()}",
        flush=True,
    )
    report = Report()
    report.values.append(("load average at the start", load()))
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-dengine-"))
    started = time.perf_counter()
    try:
        asyncio.run(docker_part(report, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        close_dialer()
    report.values.append(("Docker part", f"{ms_since(started) / 1000:.0f} s"))
    reason = qemu_skip_reason()
    if reason is not None:
        report.cpu_skipped.append(("kiln QEMU", reason))
    else:
        started = time.perf_counter()
        run_qemu(report)
        report.values.append(("QEMU part", f"{ms_since(started) / 1000:.0f} s"))
    report.values.append(("load average at the end", load()))
    print_report(report)


if __name__ == "__main__":
    main()
