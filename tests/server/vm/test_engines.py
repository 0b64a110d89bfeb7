"""Both engines in one real daemon: ``kiln serve`` with QEMU and Docker sandboxes side by
side, through the HTTP API, and both re-adopted after ``kill -9`` of the daemon.

The daemon is the real CLI in a subprocess; its sandbox networks (the VMs'
bridge and the containers' own) live in a namespace this module creates, and
its private dockerd runs there too. Everything is torn down in finalizers:
sandboxes, the dockerd (with its containers), QEMU processes, the namespace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kiln.engine.docker import Dockerd, DockerdConfig
from kiln.engine.docker.testing import unavailable_reason
from kiln.engine.qemu.process import find_processes
from kiln.images.cache import default_image_dir

from .conftest import vm_marks
from .serve import Serve

pytestmark = [*vm_marks, pytest.mark.timeout(600)]


def _skip() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _skip()
    root = tmp_path_factory.mktemp("engines")
    netns = f"kiln-eng-{secrets.token_hex(3)}"
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
                # The images built before the tests (HOME is a fresh one here).
                "image_dir": str(default_image_dir()),
                "network": {
                    "netns": netns,
                    "bridge": "kengq0",
                    "subnet": "10.213.43.0/24",
                    "nat": False,
                },
                "docker": {
                    "bridge": "kengd0",
                    "subnet": "10.213.44.0/24",
                    "root": str(docker_root),
                },
            }
        )
    )
    try:
        yield {"config": config, "home": home, "data": data, "root": root}
    finally:
        with contextlib.suppress(Exception):
            Dockerd(DockerdConfig(root=docker_root, netns=netns)).stop()
        for pid in find_processes(f"{data}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", netns], check=False)


def _client(serve: Serve, data: Path) -> httpx.Client:
    key = (data / "admin-api-key").read_text().strip()
    return httpx.Client(base_url=serve.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _exec(c: httpx.Client, name: str, *cmd: str) -> str:
    r = c.post(f"/sandboxes/{name}/exec", json={"cmd": list(cmd)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["exit_code"] == 0, body
    return str(body["stdout"])


PID1 = ("cat", "/proc/1/cmdline")


def test_both_engines_side_by_side_and_after_a_crash(setup: dict[str, Any]) -> None:
    log = setup["root"] / "serve.log"
    serve = Serve(setup["config"], setup["home"], log)
    try:
        with _client(serve, setup["data"]) as c:
            health = httpx.get(f"{serve.url}/health").json()
            assert health["engine"] == "qemu"
            assert health["engines"] == {"qemu": "ok", "docker": "ok"}
            vm = c.post("/sandboxes", json={"name": "vm", "env": {"WHO": "vm"}})
            ct = c.post("/sandboxes", json={"name": "ct", "engine": "docker", "env": {"WHO": "ct"}})
            gv = c.post("/sandboxes", json={"name": "gv", "engine": "docker", "runtime": "runsc"})
            bad = c.post("/sandboxes", json={"name": "x", "engine": "qemu", "runtime": "runc"})
            assert bad.status_code == 422 and "runtime" in bad.json()["error"]
            for r in (vm, ct, gv):
                assert r.status_code == 201, r.text
            assert (vm.json()["engine"], vm.json()["runtime"]) == ("qemu", None)
            assert (ct.json()["engine"], ct.json()["runtime"]) == ("docker", "runc")
            assert (gv.json()["engine"], gv.json()["runtime"]) == ("docker", "runsc")
            assert ct.json()["capabilities"] == {"pause": True, "snapshots": False}
            assert vm.json()["capabilities"] == {"pause": True, "snapshots": True}

            # The VM's PID 1 is the agent as init; the containers' is the agent in
            # container mode; gVisor has a kernel of its own.
            assert "--container" not in _exec(c, "vm", *PID1)
            assert "--container" in _exec(c, "ct", *PID1)
            assert "gVisor" in _exec(c, "gv", "dmesg")
            assert _exec(c, "ct", "sh", "-c", "echo $WHO") == "ct\n"
            assert _exec(c, "vm", "sh", "-c", "echo $WHO") == "vm\n"

            # A container's stop keeps its files, not its processes.
            _exec(c, "ct", "sh", "-c", "echo kept > /workspace/f; sleep 600 >/dev/null 2>&1 &")
            assert c.post("/sandboxes/ct/stop").json()["status"] == "stopped"
            assert c.post("/sandboxes/ct/start").json()["status"] == "running"
            assert _exec(c, "ct", "sh", "-c", "cat f; pgrep -c sleep || true") == "kept\n0\n"
            _exec(c, "ct", "sh", "-c", "sleep 600 >/dev/null 2>&1 &")
            _exec(c, "vm", "sh", "-c", "sleep 600 >/dev/null 2>&1 &")

        assert serve.stop(signal.SIGKILL) == -signal.SIGKILL  # the daemon crashes

        again = Serve(setup["config"], setup["home"], log)
        try:
            with _client(again, setup["data"]) as c:
                listed = {s["name"]: s for s in c.get("/sandboxes").json()}
                assert {n: (s["engine"], s["status"]) for n, s in listed.items()} == {
                    "vm": ("qemu", "running"),
                    "ct": ("docker", "running"),
                    "gv": ("docker", "running"),
                }
                # Re-adopted, not restarted: the processes started before the crash run on.
                assert _exec(c, "ct", "pgrep", "-c", "sleep") == "1\n"
                assert _exec(c, "vm", "pgrep", "-c", "sleep") == "1\n"
                assert "gVisor" in _exec(c, "gv", "dmesg")
                for name in ("vm", "ct", "gv"):
                    assert c.delete(f"/sandboxes/{name}").status_code == 204
                assert c.get("/sandboxes").json() == []
        finally:
            assert again.stop() == 0
    finally:
        serve.stop(signal.SIGKILL)
