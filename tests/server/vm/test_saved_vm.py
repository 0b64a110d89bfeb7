"""Saved images through the API over the real QEMU engine: a sandbox running a
background HTTP server is saved; two sandboxes created from the image have its file
and its server answering (the same process, restored from memory); another user can
neither see nor use the image."""

from __future__ import annotations

import time

import httpx
import pytest

from ..harness import LiveServer
from .conftest import _auth, vm_marks

pytestmark = [pytest.mark.vm, pytest.mark.netns, *vm_marks]

FETCH = (
    "python3 -c 'import urllib.request as u, sys;"
    ' sys.stdout.write(u.urlopen("http://127.0.0.1:8000/page.txt").read().decode())\''
)


def _exec(vm: httpx.Client, sandbox: str, script: str) -> dict[str, object]:
    r = vm.post(f"/sandboxes/{sandbox}/exec", json={"cmd": ["sh", "-c", script]})
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    return out


def test_sandboxes_from_a_saved_image_run_its_server(
    vm: httpx.Client, vm_server: LiveServer
) -> None:
    r = vm.post("/sandboxes", json={"name": "saver", "memory_mb": 256})
    assert r.status_code == 201, r.text
    assert _exec(vm, "saver", "echo served > /workspace/page.txt")["exit_code"] == 0
    cmd = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "8000"]
    r = vm.post("/sandboxes/saver/processes", json={"cmd": cmd, "cwd": "/workspace"})
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    deadline = time.monotonic() + 60
    while _exec(vm, "saver", FETCH)["stdout"] != "served\n":
        assert time.monotonic() < deadline, "the server never answered"
        time.sleep(0.5)

    r = vm.post("/sandboxes/saver/save", json={"name": "web"})
    assert r.status_code == 201, r.text
    saved = r.json()
    assert (saved["engine"], saved["memory"], saved["memory_mb"]) == ("qemu", True, 256)
    assert vm.get("/sandboxes/saver").json()["status"] == "running"

    made = []
    for name in ("web1", "web2"):
        r = vm.post("/sandboxes", json={"name": name, "saved_image": "web"})
        assert r.status_code == 201, r.text
        made.append(r.json())
        assert _exec(vm, name, "cat /workspace/page.txt")["stdout"] == "served\n"
        assert _exec(vm, name, FETCH)["stdout"] == "served\n"  # no restart: its memory
        proc = vm.get(f"/sandboxes/{name}/processes/{pid}").json()
        assert (proc["cmd"], proc["running"]) == (cmd, True)
        assert _exec(vm, name, "hostname")["stdout"] == f"{name}\n"
    assert len({sb["ip"] for sb in made} | {vm.get("/sandboxes/saver").json()["ip"]}) == 3

    _, other_key = vm_server.store.create_user("vm-other")
    with httpx.Client(base_url=vm_server.url, headers=_auth(other_key), timeout=60) as other:
        assert other.get("/saved-images").json() == []
        assert other.get("/saved-images/web").status_code == 404
        r = other.post("/sandboxes", json={"saved_image": "web"})
        assert r.status_code == 404, r.text
        assert other.delete("/saved-images/web").status_code == 404

    assert vm.delete("/saved-images/web").status_code == 204
    assert _exec(vm, "web1", FETCH)["stdout"] == "served\n"  # its sandboxes go on
    for name in ("saver", "web1", "web2"):
        assert vm.delete(f"/sandboxes/{name}").status_code == 204
