"""Crash points: ``kiln serve`` killed (SIGKILL, by itself: :mod:`kiln.faults`) at each
named step of create, stop, start, destroy and volume create, then restarted.

Each case: a clean daemon sets the stage if the operation needs an existing
sandbox (one with a file in /workspace, the user told the write succeeded);
a daemon started with ``KILN_CRASH_AT=<step>`` is asked for the operation and
dies at the step; a clean daemon then must show a consistent world:

- what the API lists is what exists: QEMU processes, containers, TAPs, pinned
  ARP entries, sandbox directories, volume files, live DB rows;
- a listed sandbox is usable (exec works; a stopped one starts), a create or
  destroy that never answered is either complete and usable or cleanly gone,
  and the file written before the operation is still there;
- after the case's sandbox is deleted through the API nothing is left at all.

One daemon data directory (and dockerd, and QEMU template) serves every case,
and the clean daemon that checked one case stays up to set the next one's stage
(it is stopped, and must exit 0, before any crashing daemon starts).
The service-level steps run on Docker (seconds faster, the engine does not
matter there); the QEMU engine's own steps, and the service steps whose outcome
depends on the engine's recovery, on real QEMU microVMs.
"""

from __future__ import annotations

import json
import secrets
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kiln.engine.docker.containers import LABEL
from kiln.engine.docker.daemon import sdk_client
from kiln.engine.qemu.process import find_processes
from kiln.network.naming import tap_name

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host
from .serve import Serve, client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(300)]

KEPT = "/workspace/kept"


@dataclass(frozen=True)
class Case:
    step: str
    engine: str
    op: str  # create | create_volume | stop | start | destroy | volume

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.step}"


CASES = [
    # The service layer, on Docker.
    Case("create.row_written", "docker", "create"),
    Case("create.engine_done", "docker", "create"),
    Case("create.persisted", "docker", "create"),
    Case("docker.create.container", "docker", "create"),
    Case("stop.engine_done", "docker", "stop"),
    Case("docker.stop.container_stopped", "docker", "stop"),
    Case("start.engine_done", "docker", "start"),
    Case("destroy.engine_done", "docker", "destroy"),
    Case("docker.destroy.container_removed", "docker", "destroy"),
    Case("volume.create.row_written", "docker", "volume"),
    # The QEMU engine.
    Case("qemu.create.net", "qemu", "create"),
    Case("qemu.create.disks", "qemu", "create"),
    Case("qemu.create.volume_file", "qemu", "create_volume"),
    Case("qemu.create.qemu_started", "qemu", "create"),
    Case("qemu.create.ready", "qemu", "create"),
    Case("create.engine_done", "qemu", "create_volume"),
    Case("qemu.snapshot.paused", "qemu", "stop"),
    Case("qemu.snapshot.written", "qemu", "stop"),
    Case("qemu.snapshot.qemu_quit", "qemu", "stop"),
    Case("qemu.snapshot.valid", "qemu", "stop"),
    Case("stop.engine_done", "qemu", "stop"),
    Case("qemu.restore.tap", "qemu", "start"),
    Case("qemu.restore.qemu_started", "qemu", "start"),
    Case("qemu.restore.loaded", "qemu", "start"),
    Case("qemu.restore.spent", "qemu", "start"),
    Case("start.engine_done", "qemu", "start"),
    Case("qemu.destroy.killed", "qemu", "destroy"),
    Case("qemu.destroy.net", "qemu", "destroy"),
    Case("qemu.destroy.disks", "qemu", "destroy"),
    Case("destroy.engine_done", "qemu", "destroy"),
]


class Lab:
    """One daemon host (one data directory) and the checks of what exists on it."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.data = host.data
        self.netns = host.netns
        self._clean: Serve | None = None
        self._clean_of = ""

    def serve(self, crash_at: str | None = None) -> Serve:
        return self.host.serve(env={"KILN_CRASH_AT": crash_at})

    def clean(self, of: str) -> Serve:
        """A daemon without a crash point: the one left up by the last case, else a new one
        (``of``: what it is for, named if its shutdown fails later)."""
        if self._clean is None:
            self._clean, self._clean_of = self.serve(), of
        return self._clean

    def stop_clean(self, *, check: bool = True) -> None:
        """Stop the clean daemon, if one is up (nothing else may hold the data directory
        while a crashing daemon runs); with ``check`` it must exit 0."""
        serve, self._clean = self._clean, None
        if serve is not None:
            code = serve.stop()
            assert code == 0 or not check, f"the clean daemon of {self._clean_of} exited {code}"

    # --- what exists -------------------------------------------------------------------

    def qemu_dirs(self) -> set[str]:
        d = self.data / "qemu" / "sandboxes"
        return {e.name for e in d.iterdir()} if d.is_dir() else set()

    def docker_dirs(self) -> set[str]:
        d = self.data / "docker-engine" / "sandboxes"
        return {e.name for e in d.iterdir()} if d.is_dir() else set()

    def qemu_processes(self) -> set[str]:
        """Sandbox ids of the QEMU processes running under the data directory."""
        marker = f"{self.data}/qemu/sandboxes/"
        owners = set()
        for pid in find_processes(marker):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            owners.add(cmdline.split(marker, 1)[1].split("/", 1)[0])
        return owners

    def containers(self) -> dict[str, str]:
        """Sandbox id → state of every container kiln made."""
        config = self.host.dockerd
        if not config.socket_path.exists():
            return {}
        docker = sdk_client(config.url)
        try:
            found = docker.api.containers(all=True, filters={"label": [LABEL]})
        finally:
            docker.close()
        return {(c.get("Labels") or {})[LABEL]: c["State"] for c in found}

    def _ip(self, *args: str) -> Any:
        out = subprocess.run(
            ["ip", "-n", self.netns, "-j", *args], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out or "[]")

    def taps(self) -> set[str]:
        return {
            link["ifname"] for link in self._ip("link", "show") if link["ifname"].startswith("ktap")
        }

    def pinned(self) -> set[str]:
        """Addresses with a PERMANENT ARP entry on the VMs' bridge."""
        return {
            n["dst"]
            for n in self._ip("neigh", "show", "dev", self.host.vm.name)
            if "PERMANENT" in n.get("state", [])
        }

    def intents(self) -> set[str]:
        d = self.data / "intents"
        return {e.name for e in d.iterdir()} if d.is_dir() else set()

    def db(self, query: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.data / 'kiln.db'}?mode=ro", uri=True)
        try:
            return list(conn.execute(query))
        finally:
            conn.close()

    def volume_files(self) -> set[str]:
        d = self.data / "volumes"
        return {str(e) for e in d.iterdir() if e.suffix == ".ext4"} if d.is_dir() else set()

    def agrees(self, listed: list[dict[str, Any]]) -> list[str]:
        """Where the host disagrees with the API's list of sandboxes."""
        problems = []
        vms = {s["id"]: s for s in listed if s["engine"] == "qemu"}
        cts = {s["id"]: s for s in listed if s["engine"] == "docker"}
        live_rows = {r[0] for r in self.db("SELECT id FROM sandboxes WHERE deleted_at IS NULL")}
        if live_rows != {s["id"] for s in listed}:
            problems.append(f"live DB rows {live_rows} != listed {set(vms) | set(cts)}")
        for s in listed:
            if s["status"] not in ("running", "stopped"):
                problems.append(f"{s['name']} is {s['status']}")
        if self.qemu_dirs() != set(vms):
            problems.append(f"VM directories {self.qemu_dirs()} != listed VMs {set(vms)}")
        live_vms = {
            sid for sid, s in vms.items() if s["status"] == "running" and s["thermal"] != "cold"
        }
        if self.qemu_processes() != live_vms:
            problems.append(f"QEMU processes of {self.qemu_processes()} != hot/warm VMs {live_vms}")
        taps = {tap_name("ktap", sid) for sid in vms}
        if self.taps() != taps:
            problems.append(f"TAPs {self.taps()} != those of the listed VMs {taps}")
        ips = {s["ip"] for s in vms.values()}
        if self.pinned() != ips:
            problems.append(f"pinned addresses {self.pinned()} != the listed VMs' {ips}")
        if self.docker_dirs() != set(cts):
            problems.append(f"container directories {self.docker_dirs()} != listed {set(cts)}")
        containers = self.containers()
        if set(containers) != set(cts):
            problems.append(f"containers {containers} != listed {set(cts)}")
        for sid, s in cts.items():
            running = containers.get(sid) in ("running", "paused")
            # Running and cold with its container exited: it boots on next use (a
            # stop cut short before it was recorded leaves exactly that).
            rebooting = s["status"] == "running" and s["thermal"] == "cold"
            if running != (s["status"] == "running" and not rebooting):
                problems.append(f"container of {s['name']} is {containers.get(sid)}: {s['status']}")
        rows = self.db("SELECT path FROM volumes")
        files = {p for (p,) in rows if Path(p).exists()}
        if self.volume_files() != files:
            problems.append(f"volume files {self.volume_files()} != those of volume rows {files}")
        if self.intents():
            problems.append(f"unfinished intents {self.intents()}")
        return problems


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with daemon_host(
        tmp_path_factory.mktemp("crash"),
        "kiln-crash",
        vm=Bridge("kcrq0", "10.213.45.0/24"),
        docker=Bridge("kcrd0", "10.213.46.0/24"),
        # Nothing goes warm or cold by itself: only the test's operations reach the
        # snapshot steps.
        extra={"thermal": {"hot_to_warm_s": 3600, "warm_to_cold_s": 7200}},
    ) as host:
        lab = Lab(host)
        try:
            # Warm up once: the QEMU template and the Docker image, so that no case
            # builds them (a template build takes snapshots: it would reach those steps).
            with client(lab.clean("the warm-up"), lab.data) as c:
                for engine in ("qemu", "docker"):
                    r = c.post("/sandboxes", json={"name": f"warm-{engine}", "engine": engine})
                    assert r.status_code == 201, r.text
                    assert c.delete(f"/sandboxes/warm-{engine}").status_code == 204
            yield lab
        finally:
            lab.stop_clean()


def _stage(lab: Lab, case: Case, name: str, content: str) -> None:
    """The sandbox the operation needs: created, a file written, stopped for a start."""
    try:
        with client(lab.clean(f"staging {case.id}"), lab.data) as c:
            r = c.post("/sandboxes", json={"name": name, "engine": case.engine})
            assert r.status_code == 201, r.text
            exec_ok(c, name, "sh", "-c", f"echo {content} > {KEPT} && sync")
            if case.op == "start":
                r = c.post(f"/sandboxes/{name}/stop")
                assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
    except BaseException:
        lab.stop_clean(check=False)  # the staging's own failure is the one reported
        raise
    lab.stop_clean()


def _operate(c: httpx.Client, case: Case, name: str) -> httpx.Response:
    match case.op:
        case "create":
            return c.post("/sandboxes", json={"name": name, "engine": case.engine})
        case "create_volume":
            vol = {"name": f"{name}-v", "size_mb": 16, "mount": "/data"}
            return c.post(
                "/sandboxes", json={"name": name, "engine": case.engine, "new_volumes": [vol]}
            )
        case "stop":
            return c.post(f"/sandboxes/{name}/stop")
        case "start":
            return c.post(f"/sandboxes/{name}/start")
        case "destroy":
            return c.delete(f"/sandboxes/{name}")
        case "volume":
            return c.post("/volumes", json={"name": f"{name}-v", "size_mb": 16})
    raise AssertionError(case.op)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crash_point_ends_consistent(lab: Lab, case: Case) -> None:
    name = f"c{secrets.token_hex(3)}"
    content = secrets.token_hex(8)
    staged = case.op in ("stop", "start", "destroy")
    if staged:
        _stage(lab, case, name, content)
    else:
        lab.stop_clean()

    crashing = lab.serve(crash_at=case.step)
    try:
        with client(crashing, lab.data) as c, pytest.raises(httpx.TransportError):
            r = _operate(c, case, name)
            pytest.fail(f"the operation answered {r.status_code} {r.text}: no crash")
        assert crashing.wait() == -signal.SIGKILL
        assert f"crash point {case.step} reached" in crashing.output()
    finally:
        crashing.stop(signal.SIGKILL)

    passed = False
    try:
        with client(lab.clean(f"the check of {case.id}"), lab.data) as c:
            listed = c.get("/sandboxes").json()
            problems = lab.agrees(listed)
            mine = next((s for s in listed if s["name"] == name), None)
            volumes = {v["name"]: v for v in c.get("/volumes").json()}
            if staged and case.op != "destroy":
                # Created and written before the operation: the user was told so.
                assert mine is not None, f"{name} is gone: {listed}"
            if case.op == "volume":
                assert f"{name}-v" in volumes, volumes  # the row was written
            if case.op == "create_volume" and mine is None and f"{name}-v" in volumes:
                problems.append(f"the volume of the undone create is left: {volumes}")
            if mine is not None:
                if mine["status"] == "stopped":
                    r = c.post(f"/sandboxes/{name}/start")
                    if r.status_code != 200:
                        problems.append(f"start after the crash: {r.status_code} {r.text}")
                r = c.post(f"/sandboxes/{name}/exec", json={"cmd": ["cat", KEPT]})
                if staged:
                    want = (200, 0, f"{content}\n")
                    got = r.status_code, r.json().get("exit_code"), r.json().get("stdout")
                    if got != want:
                        problems.append(f"after the crash {KEPT}: {r.status_code} {r.text}")
                elif r.status_code != 200:
                    problems.append(f"exec after the crash: {r.status_code} {r.text}")
            # Whatever is left can be deleted, and then nothing is left.
            for s in c.get("/sandboxes").json():
                r = c.delete(f"/sandboxes/{s['id']}")
                if r.status_code != 204:
                    problems.append(f"delete of {s['name']}: {r.status_code} {r.text}")
            for v in c.get("/volumes").json():
                r = c.delete(f"/volumes/{v['name']}")
                if r.status_code != 204:
                    problems.append(f"delete of volume {v['name']}: {r.status_code} {r.text}")
            problems += [f"after deleting everything: {p}" for p in lab.agrees([])]
        passed = not problems
    finally:
        if not passed:  # the next case starts from a fresh daemon; this failure is reported
            lab.stop_clean(check=False)
    assert not problems, "\n".join(problems)
