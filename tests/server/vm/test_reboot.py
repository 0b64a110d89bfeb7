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
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kiln.engine.docker import Dockerd, DockerdConfig
from kiln.engine.docker.daemon import sdk_client
from kiln.engine.docker.record import container_name
from kiln.engine.docker.testing import unavailable_reason
from kiln.engine.qemu.process import find_processes
from kiln.images.cache import default_image_dir

from .conftest import vm_marks
from .serve import Serve

pytestmark = [*vm_marks, pytest.mark.timeout(900)]

BRIDGE = "krbq0"
INIT = "echo ran >> /workspace/init-runs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("reboot")
    netns = f"kiln-rb-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    data, home, docker_root = root / "data", root / "home", root / "d"
    home.mkdir()
    config = root / "kiln.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data),
                "listen": "127.0.0.1:0",
                "image_dir": str(default_image_dir()),
                "network": {
                    "netns": netns,
                    "bridge": BRIDGE,
                    "subnet": "10.213.45.0/24",
                    "nat": False,
                },
                "docker": {"bridge": "krbd0", "subnet": "10.213.46.0/24", "root": str(docker_root)},
            }
        )
    )
    dockerd = DockerdConfig(root=docker_root, netns=netns)
    try:
        yield {"config": config, "home": home, "data": data, "root": root, "netns": netns,
               "dockerd": dockerd}  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            Dockerd(dockerd).stop()
        _kill_qemus(data)
        subprocess.run(["ip", "netns", "delete", netns], check=False)


def _kill_qemus(data: Path) -> list[int]:
    pids = find_processes(f"{data}/")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _client(serve: Serve, data: Path) -> httpx.Client:
    key = (data / "admin-api-key").read_text().strip()
    return httpx.Client(base_url=serve.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _exec(c: httpx.Client, name: str, script: str) -> str:
    r = c.post(f"/sandboxes/{name}/exec", json={"cmd": ["sh", "-c", script]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["exit_code"] == 0, body
    return str(body["stdout"])


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


def test_a_host_reboot_keeps_every_sandbox_whose_disk_survived(setup: dict[str, Any]) -> None:
    data, netns = setup["data"], setup["netns"]
    log = setup["root"] / "serve.log"
    serve = Serve(setup["config"], setup["home"], log)
    try:
        with _client(serve, data) as c:
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
                assert _exec(c, name, WORK) == "ok\n"
                assert _exec(c, name, "pgrep -c sleep") == "1\n"
            _exec(c, "vm", "echo on-the-volume > /data/v.txt")
            before = {s["name"]: s for s in c.get("/sandboxes").json()}
            assert before["vm"]["status"] == "running" and before["vm"]["thermal"] == "hot"
            vm_id, vmgone_id = before["vm"]["id"], before["vmgone"]["id"]
            ct_id, ctgone_id = before["ct"]["id"], before["ctgone"]["id"]

        # ---- the host "reboots": nothing shuts down cleanly.
        assert serve.stop(signal.SIGKILL) == -signal.SIGKILL
        killed = _kill_qemus(data)
        assert len(killed) == 2
        _wait_gone(killed)
        _lose_the_host_network(netns)
        with contextlib.closing(sdk_client(setup["dockerd"].url)) as docker:
            pid = docker.api.inspect_container(container_name(ct_id))["State"]["Pid"]
            os.kill(pid, signal.SIGKILL)
            docker.api.remove_container(container_name(ctgone_id), force=True)
        # vmgone's disk is lost with the host (its overlay is unreadable): it cannot boot.
        (data / "qemu" / "sandboxes" / vmgone_id / "rootfs.qcow2").unlink()

        restarted = time.perf_counter()
        again = Serve(setup["config"], setup["home"], log)
        try:
            with _client(again, data) as c:
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
                assert _exec(c, "vm", "cat /workspace/notes.txt") == "precious\n"
                vm_ready = time.perf_counter()
                assert _exec(c, "ct", "cat /workspace/notes.txt") == "precious\n"
                ct_ready = time.perf_counter()
                for name in ("vm", "ct"):
                    sb = c.get(f"/sandboxes/{name}").json()
                    assert (sb["status"], sb["thermal"]) == ("running", "hot")
                    assert sb["last_boot"]["reason"] == "rebooted", sb
                    assert sb["ip"] == before[name]["ip"]
                    assert _exec(c, name, "cat /workspace/src/app.py") == "print(42)\n"
                    assert _exec(c, name, "pgrep -c sleep || true") == "0\n"
                    assert _exec(c, name, "cat /workspace/init-runs") == "ran\n"
                    assert _exec(c, name, "echo new > /workspace/after && cat after") == "new\n"
                assert _exec(c, "vm", "cat /data/v.txt") == "on-the-volume\n"
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
