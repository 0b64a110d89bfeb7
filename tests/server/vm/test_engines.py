"""Both engines in one real daemon: ``kiln serve`` with QEMU and Docker sandboxes side by
side, through the HTTP API, and both re-adopted after ``kill -9`` of the daemon.

The daemon is the real CLI in a subprocess; its sandbox networks (the VMs'
bridge and the containers' own) live in a namespace this module creates, and
its private dockerd runs there too. Everything is torn down in finalizers:
sandboxes, the dockerd (with its containers), QEMU processes, the namespace.
"""

from __future__ import annotations

import io
import signal
import tarfile
from collections.abc import Iterator

import httpx
import pytest

from .conftest import vm_marks
from .host import Bridge, Host, daemon_host
from .serve import client, exec_ok

pytestmark = [*vm_marks, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with daemon_host(
        tmp_path_factory.mktemp("engines"),
        "kiln-eng",
        vm=Bridge("kengq0", "10.213.43.0/24"),
        docker=Bridge("kengd0", "10.213.44.0/24"),
    ) as host:
        yield host


PID1 = ("cat", "/proc/1/cmdline")


def test_both_engines_side_by_side_and_after_a_crash(setup: Host) -> None:
    serve = setup.serve()
    try:
        with client(serve, setup.data) as c:
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
            assert ct.json()["capabilities"] == {"pause": True, "snapshots": False, "fork": False}
            assert vm.json()["capabilities"] == {"pause": True, "snapshots": True, "fork": True}

            # The VM's PID 1 is the agent as init; the containers' is the agent in
            # container mode; gVisor has a kernel of its own.
            assert "--container" not in exec_ok(c, "vm", *PID1)
            assert "--container" in exec_ok(c, "ct", *PID1)
            assert "gVisor" in exec_ok(c, "gv", "dmesg")
            assert exec_ok(c, "ct", "sh", "-c", "echo $WHO") == "ct\n"
            assert exec_ok(c, "vm", "sh", "-c", "echo $WHO") == "vm\n"
            for name in ("ct", "gv"):
                check_archive_round_trip(c, name)

            # A container's stop keeps its files, not its processes.
            exec_ok(c, "ct", "sh", "-c", "echo kept > /workspace/f; sleep 600 >/dev/null 2>&1 &")
            assert c.post("/sandboxes/ct/stop").json()["status"] == "stopped"
            assert c.post("/sandboxes/ct/start").json()["status"] == "running"
            assert exec_ok(c, "ct", "sh", "-c", "cat f; pgrep -c sleep || true") == "kept\n0\n"
            exec_ok(c, "ct", "sh", "-c", "sleep 600 >/dev/null 2>&1 &")
            exec_ok(c, "vm", "sh", "-c", "sleep 600 >/dev/null 2>&1 &")

            # A container cannot be forked (no checkpoint on runc); a VM can, and its
            # copy is re-adopted after the crash like any sandbox.
            refused = c.post("/sandboxes/ct/fork", json={"name": "ctf"})
            assert refused.status_code == 409, refused.text
            assert "docker" in refused.json()["error"] and "runc" in refused.json()["error"]
            assert c.get("/sandboxes/ctf").status_code == 404
            vmf = c.post("/sandboxes/vm/fork", json={"name": "vmf"})
            assert vmf.status_code == 201, vmf.text
            assert vmf.json()["engine"] == "qemu" and vmf.json()["ip"] != vm.json()["ip"]
            assert exec_ok(c, "vmf", "sh", "-c", "echo $WHO; pgrep -c sleep") == "vm\n1\n"

        assert serve.stop(signal.SIGKILL) == -signal.SIGKILL  # the daemon crashes

        again = setup.serve()
        try:
            with client(again, setup.data) as c:
                listed = {s["name"]: s for s in c.get("/sandboxes").json()}
                assert {n: (s["engine"], s["status"]) for n, s in listed.items()} == {
                    "vm": ("qemu", "running"),
                    "vmf": ("qemu", "running"),
                    "ct": ("docker", "running"),
                    "gv": ("docker", "running"),
                }
                # Re-adopted, not restarted: the processes started before the crash run on.
                assert exec_ok(c, "ct", "pgrep", "-c", "sleep") == "1\n"
                assert exec_ok(c, "vm", "pgrep", "-c", "sleep") == "1\n"
                assert exec_ok(c, "vmf", "pgrep", "-c", "sleep") == "1\n"
                assert exec_ok(c, "vmf", "hostname") == "vmf\n"
                assert "gVisor" in exec_ok(c, "gv", "dmesg")
                for name in ("vm", "vmf", "ct", "gv"):
                    assert c.delete(f"/sandboxes/{name}").status_code == 204
                assert c.get("/sandboxes").json() == []
        finally:
            assert again.stop() == 0
    finally:
        serve.stop(signal.SIGKILL)


def _tree_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind, mode, data in (
            ("t", tarfile.DIRTYPE, 0o755, b""),
            ("t/empty", tarfile.DIRTYPE, 0o700, b""),
            ("t/run.sh", tarfile.REGTYPE, 0o755, b"#!/bin/sh\necho ran\n"),
            ("t/run", tarfile.SYMTYPE, 0o777, b""),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size = kind, mode, len(data)
            info.linkname = "run.sh" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def check_archive_round_trip(c: httpx.Client, name: str) -> None:
    """``kiln cp``'s routes run tar in the sandbox: it must work the same in runc and
    runsc containers (QEMU guests: tests/cli/test_vm.py)."""
    put = c.put(f"/sandboxes/{name}/archive?path=/workspace", content=_tree_tar())
    assert put.status_code == 200, put.text
    assert exec_ok(
        c, name, "sh", "-c",
        # find, not stat: this gVisor release has no statx
        "cd /workspace/t && find empty run.sh -printf '%p %u %m\\n' && ./run",
    ) == "empty sandbox 700\nrun.sh sandbox 755\nran\n"  # fmt: skip
    got = c.get(f"/sandboxes/{name}/archive?path=/workspace/t")
    assert got.status_code == 200, got.text
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        members = {m.name: (m.type, m.mode, m.linkname) for m in tar}
    assert members == {
        "t": (tarfile.DIRTYPE, 0o755, ""),
        "t/empty": (tarfile.DIRTYPE, 0o700, ""),
        "t/run.sh": (tarfile.REGTYPE, 0o755, ""),
        "t/run": (tarfile.SYMTYPE, 0o777, "run.sh"),
    }
