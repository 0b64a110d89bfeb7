"""Reboot recovery through a real daemon: a host reboot, simulated, loses no user's files.

``kiln serve`` runs as a subprocess with QEMU and Docker sandboxes. The "host
reboot" is ``kill -9`` of the daemon and of every QEMU, the TAPs and the bridge
deleted (a reboot loses them), one container's processes killed and another
container removed. After the restart a sandbox whose machine is gone but whose
disk is not is running and cold; its next use boots it from its disk: its
files (and volume) are there, its processes are not, its init did not run
again, ``last_boot`` says ``rebooted`` and the daemon's log says so too. A
sandbox whose disk is gone is ``error`` and says why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kiln.engine.docker.daemon import sdk_client
from kiln.engine.docker.record import container_name
from kiln.engine.qemu.process import find_processes

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host, kill_vms
from .serve import client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(900)]

BRIDGE = "krbq0"
INIT = "echo ran >> /workspace/init-runs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with daemon_host(
        tmp_path_factory.mktemp("reboot"),
        "kiln-rb",
        vm=Bridge(BRIDGE, "10.213.45.0/24"),
        docker=Bridge("krbd0", "10.213.46.0/24"),
    ) as host:
        yield host


def _sh(c: httpx.Client, name: str, script: str) -> str:
    return exec_ok(c, name, "sh", "-c", script)


def _links(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def _lose_the_host_network(netns: str) -> None:
    """What a host reboot does to kiln's network: TAPs, bridge and ARP entries are gone."""
    for link in _links(netns):
        if link.startswith("ktap") or link == BRIDGE:
            subprocess.run(["ip", "-n", netns, "link", "del", link], check=True)
    subprocess.run(["ip", "-n", netns, "neigh", "flush", "all"], check=False)


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


WORK = (
    "echo precious > /workspace/notes.txt && mkdir -p /workspace/src"
    " && echo 'print(42)' > /workspace/src/app.py"
    " && sleep 600 >/dev/null 2>&1 &"
    " sleep 0.2; echo ok"
)


def test_a_host_reboot_keeps_every_sandbox_whose_disk_survived(setup: Host) -> None:
    data, netns, log = setup.data, setup.netns, setup.log
    serve = setup.serve()
    try:
        with client(serve, data) as c:
            vm = c.post(
                "/sandboxes",
                json={
                    "name": "vm",
                    "init": INIT,
                    "new_volumes": [{"name": "vmdata", "size_mb": 16, "mount": "/data"}],
                },
            )
            assert vm.status_code == 201, vm.text
            assert vm.json()["last_boot"]["reason"] == "created"
            for body in (
                {"name": "vmgone"},
                {"name": "ct", "engine": "docker", "init": INIT},
                {"name": "ctgone", "engine": "docker"},
            ):
                r = c.post("/sandboxes", json=body)
                assert r.status_code == 201, r.text
            for name in ("vm", "ct"):
                assert _sh(c, name, WORK) == "ok\n"
                assert _sh(c, name, "pgrep -c sleep") == "1\n"
            _sh(c, "vm", "echo on-the-volume > /data/v.txt")
            before = {s["name"]: s for s in c.get("/sandboxes").json()}
            assert before["vm"]["status"] == "running" and before["vm"]["thermal"] == "hot"
            vm_id, vmgone_id = before["vm"]["id"], before["vmgone"]["id"]
            ct_id, ctgone_id = before["ct"]["id"], before["ctgone"]["id"]

        # ---- the host "reboots": nothing shuts down cleanly.
        assert serve.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = kill_vms(data)
        assert len(killed) == 2
        _wait_gone(killed)
        _lose_the_host_network(netns)
        with contextlib.closing(sdk_client(setup.dockerd.url)) as docker:
            pid = docker.api.inspect_container(container_name(ct_id))["State"]["Pid"]
            os.kill(pid, signal.SIGKILL)
            docker.api.remove_container(container_name(ctgone_id), force=True)
        # vmgone's disk is lost with the host (its overlay is unreadable): it cannot boot.
        (data / "qemu" / "sandboxes" / vmgone_id / "rootfs.qcow2").unlink()

        restarted = time.perf_counter()
        again = setup.serve()
        try:
            with client(again, data) as c:
                served = time.perf_counter()
                after = {s["name"]: s for s in c.get("/sandboxes").json()}
                state = {n: (s["status"], s["thermal"]) for n, s in after.items()}
                assert state == {
                    "vm": ("running", "cold"),  # boots from its disk on next use
                    "ct": ("running", "cold"),
                    "vmgone": ("error", "cold"),
                    "ctgone": ("error", "cold"),
                }
                # The first use boots it: files and volume kept, processes and init not.
                assert _sh(c, "vm", "cat /workspace/notes.txt") == "precious\n"
                vm_ready = time.perf_counter()
                assert _sh(c, "ct", "cat /workspace/notes.txt") == "precious\n"
                ct_ready = time.perf_counter()
                for name in ("vm", "ct"):
                    sb = c.get(f"/sandboxes/{name}").json()
                    assert (sb["status"], sb["thermal"]) == ("running", "hot")
                    assert sb["last_boot"]["reason"] == "rebooted", sb
                    assert sb["ip"] == before[name]["ip"]
                    assert _sh(c, name, "cat /workspace/src/app.py") == "print(42)\n"
                    assert _sh(c, name, "pgrep -c sleep || true") == "0\n"
                    assert _sh(c, name, "cat /workspace/init-runs") == "ran\n"
                    assert _sh(c, name, "echo new > /workspace/after && cat after") == "new\n"
                assert _sh(c, "vm", "cat /data/v.txt") == "on-the-volume\n"
                assert any(link.startswith("ktap") for link in _links(netns))

                for name, why in (("vmgone", "rootfs.qcow2 is missing"), ("ctgone", "is gone")):
                    r = c.post(f"/sandboxes/{name}/exec", json={"cmd": ["true"]})
                    assert r.status_code == 409, r.text
                    assert why in r.json()["error"] and "deleted" in r.json()["error"], r.text
                text = log.read_text(errors="replace")
                for sid in (vm_id, ct_id):
                    assert f"recovery: sandbox {sid}: running/hot → running/cold, rebooted" in text
                assert "2 rebooted" in text
                assert f"recovery: sandbox {vmgone_id} is error: its disk" in text
                assert f"recovery: sandbox {ctgone_id} is error: its container" in text
                print(
                    f"\nreboot recovery: daemon start → API {served - restarted:.2f} s;"
                    f" → VM answers exec {vm_ready - restarted:.2f} s"
                    f" (boot on first use {vm_ready - served:.2f} s);"
                    f" container exec after that {ct_ready - vm_ready:.2f} s"
                )
                for name in ("vm", "vmgone", "ct", "ctgone"):
                    assert c.delete(f"/sandboxes/{name}").status_code == 204
                assert c.get("/sandboxes").json() == []
        finally:
            assert again.stop() == 0
        assert find_processes(f"{data}/") == []
        assert not any(link.startswith("ktap") for link in _links(netns))
    finally:
        serve.stop(signal.SIGKILL)
