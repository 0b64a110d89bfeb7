"""The API over the real QEMU engine (microVMs), inside a network namespace of our own.

Each module-scoped server gets a fresh ``ip netns add`` namespace for its sandbox
network (bridge, TAPs, guest IPs), removed in a finalizer, so no traffic leaves
it. Needs root, QEMU and a buildable ``minimal`` image.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from kiln.engine.qemu.process import find_processes
from kiln.images import default_image_dir

from ..harness import LiveServer
from .conftest import _auth, _kill_vms, vm_marks

pytestmark = [pytest.mark.vm, pytest.mark.netns, *vm_marks]

SRC = Path(__file__).resolve().parents[3] / "src"


@pytest.fixture(scope="module")
def box(vm_server: LiveServer) -> str:
    """One sandbox for the tests that need a running VM but not a fresh one (streaming,
    a shell, background children): each adds processes of its own and looks only at
    those. The module's end deletes it."""
    key: str = vm_server.key  # type: ignore[attr-defined]
    with httpx.Client(base_url=vm_server.url, headers=_auth(key), timeout=300) as c:
        r = c.post("/sandboxes", json={"name": "box"})
        assert r.status_code == 201, r.text
    return "box"


def test_lifecycle_in_a_vm(vm: httpx.Client, vm_server: LiveServer) -> None:
    assert vm.post("/secrets", json={"name": "TOKEN", "value": "t0k"}).status_code == 201
    r = vm.post("/sandboxes", json={"name": "real", "env": {"A": "b"}, "secrets": ["TOKEN"]})
    assert r.status_code == 201, r.text
    sb = r.json()
    assert (sb["engine"], sb["status"], sb["thermal"]) == ("qemu", "running", "hot")
    assert sb["ip"].startswith("10.213.42.")

    out = vm.post("/sandboxes/real/exec", json={"cmd": ["sh", "-c", "echo $A $TOKEN; id -u"]})
    assert out.json() == {"exit_code": 0, "stdout": "b t0k\n1000\n", "stderr": ""}

    data = os.urandom(300_000)
    assert vm.put("/sandboxes/real/files?path=/workspace/blob", content=data).status_code == 200
    r = vm.get("/sandboxes/real/files?path=/workspace/blob")
    assert r.content == data and r.headers["content-length"] == str(len(data))
    r = vm.head("/sandboxes/real/files?path=/workspace")
    assert r.headers["x-file-isdir"] == "true"

    r = vm.post("/sandboxes/real/stop")
    assert (r.json()["status"], r.json()["thermal"]) == ("stopped", "cold")
    # Listing does not wake it; using it does (and the disk content survived).
    assert vm.get("/sandboxes/real").json()["thermal"] == "cold"
    r = vm.post("/sandboxes/real/exec", json={"cmd": ["sha256sum", "/workspace/blob"]})
    assert r.json()["exit_code"] == 0
    assert vm.get("/sandboxes/real").json()["status"] == "running"

    assert vm.delete("/sandboxes/real").status_code == 204
    assert sb["id"] not in {i.sandbox_id for i in vm_server.engine.list()}


def test_stream_and_disconnect_in_a_vm(vm: httpx.Client, vm_server: LiveServer, box: str) -> None:
    lines = []
    with vm.stream(
        "POST",
        f"/sandboxes/{box}/exec",
        json={"cmd": ["sh", "-c", "echo a; sleep 0.5; echo b >&2; exit 3"]},
        headers={"Accept": "application/x-ndjson"},
    ) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines == [
        {"type": "stdout", "data": "a\n"},
        {"type": "stderr", "data": "b\n"},
        {"type": "exit", "exit_code": 3},
    ]
    key: str = vm_server.key  # type: ignore[attr-defined]
    with (
        httpx.Client(base_url=vm_server.url, headers=_auth(key), timeout=60) as other,
        other.stream(
            "POST",
            f"/sandboxes/{box}/exec",
            json={"cmd": ["sh", "-c", "echo $$ > /tmp/pid; echo go; exec sleep 300"]},
            headers={"Accept": "application/x-ndjson"},
        ) as r,
    ):
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = vm.post(
            f"/sandboxes/{box}/exec", json={"cmd": ["sh", "-c", "kill -0 $(cat /tmp/pid)"]}
        ).json()
        if out["exit_code"] != 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the command survived its client")


async def test_shell_in_a_vm(vm_server: LiveServer, box: str) -> None:
    key: str = vm_server.key  # type: ignore[attr-defined]
    url = vm_server.ws_url + f"/sandboxes/{box}/ws?cmd=/bin/bash&rows=40&cols=120"
    async with connect(url, additional_headers=_auth(key)) as ws:
        await ws.send(b"stty size; echo vm-$((40+2))\n")
        seen = b""
        async with asyncio.timeout(30):
            while b"vm-42" not in seen:
                message = await ws.recv()
                assert isinstance(message, bytes)
                seen += message
        assert b"40 120" in seen


# ensurepip under TCG takes ~40 s on a quiet host and several times that on a busy
# one: the exec allows 240 s, so the test must too.
@pytest.mark.timeout(420)
def test_root_sudo_pip_and_venv_in_a_vm(vm: httpx.Client, vm_server: LiveServer) -> None:
    r = vm.post("/sandboxes", json={"name": "tools"})
    assert r.status_code == 201, r.text

    def run(script: str, **extra: object) -> dict[str, object]:
        r = vm.post("/sandboxes/tools/exec", json={"cmd": ["sh", "-c", script], **extra})
        assert r.status_code == 200, r.text
        out: dict[str, object] = r.json()
        return out

    me = "id -un; id -u; echo $HOME"
    assert run(me) == {"exit_code": 0, "stdout": "sandbox\n1000\n/home/sandbox\n", "stderr": ""}
    assert run(me, user="sandbox")["stdout"] == "sandbox\n1000\n/home/sandbox\n"
    assert run(me, user="root") == {"exit_code": 0, "stdout": "root\n0\n/root\n", "stderr": ""}
    r = vm.post("/sandboxes/tools/exec", json={"cmd": ["id"], "user": "nobody"})
    assert r.status_code == 422 and "'root' or 'sandbox'" in r.json()["error"], r.text

    # Passwordless sudo for the sandbox user, without a warning on stderr.
    assert run("sudo -n id -u") == {"exit_code": 0, "stdout": "0\n", "stderr": ""}

    pip = run("python3 -m pip --version")
    assert pip["exit_code"] == 0 and str(pip["stdout"]).startswith("pip "), pip
    # A venv with its own pip (ensurepip installs it from the bundled wheels, offline).
    venv = run(
        "python3 -m venv /tmp/v && /tmp/v/bin/python -c 'import sys; print(sys.prefix)'"
        " && /tmp/v/bin/python -m pip --version",
        timeout_s=240.0,
    )
    assert venv["exit_code"] == 0, venv
    lines = str(venv["stdout"]).splitlines()
    assert lines[0] == "/tmp/v" and lines[1].startswith("pip "), venv

    async def root_shell() -> bytes:
        key: str = vm_server.key  # type: ignore[attr-defined]
        url = vm_server.ws_url + "/sandboxes/tools/ws?cmd=/bin/sh&user=root"
        seen = b""
        async with connect(url, additional_headers=_auth(key)) as ws:
            await ws.send(b"echo uid=$(id -u)=\n")
            async with asyncio.timeout(30):
                while b"uid=0=" not in seen:
                    message = await ws.recv()
                    assert isinstance(message, bytes)
                    seen += message
        return seen

    assert b"uid=0=" in asyncio.run(root_shell())


def test_volume_outlives_its_sandbox(vm: httpx.Client) -> None:
    assert vm.post("/volumes", json={"name": "keep", "size_mb": 16}).status_code == 201
    r = vm.post(
        "/sandboxes", json={"name": "writer", "volumes": [{"name": "keep", "mount": "/data"}]}
    )
    assert r.status_code == 201, r.text
    out = vm.post(
        "/sandboxes/writer/exec", json={"cmd": ["sh", "-c", "echo persisted > /data/f; sync"]}
    )
    assert out.json()["exit_code"] == 0, out.text
    assert vm.delete("/volumes/keep").status_code == 409
    r = vm.post("/sandboxes/writer/fork", json={"name": "writer2"})
    assert r.status_code == 409 and "volume" in r.json()["error"], r.text
    assert vm.get("/sandboxes/writer2").status_code == 404
    assert vm.post("/sandboxes/nobody/fork").status_code == 404
    assert vm.delete("/sandboxes/writer").status_code == 204
    r = vm.post("/sandboxes", json={"name": "reader", "volumes": [{"name": "keep", "mount": "/v"}]})
    assert r.status_code == 201, r.text
    assert vm.get("/sandboxes/reader/files?path=/v/f").content == b"persisted\n"
    assert vm.delete("/sandboxes/reader").status_code == 204
    assert vm.delete("/volumes/keep").status_code == 204


# --- the daemon with QEMU: a VM survives the daemon being killed -------------------------


def _daemon(
    data: Path, home: Path, netns: str, extra: dict[str, object] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    # HOME is a temporary one (for ~/.kiln/config.yaml); the image cache stays shared.
    # No warm pool: its members would be VMs these tests do not expect.
    image_dir = default_image_dir()
    code = (
        "import sys, asyncio, json, logging\n"
        "from kiln.config import load_config\n"
        "from kiln.server import serve\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "cfg = load_config(None, {'data_dir': sys.argv[1], 'listen': '127.0.0.1:0',"
        " 'engine': 'qemu', 'network': {'netns': sys.argv[2], 'bridge': 'kilnsrv1',"
        " 'subnet': '10.213.43.0/24', 'nat': False}, 'pool': {'size': 0},"
        " **json.loads(sys.argv[3])})\n"
        "asyncio.run(serve(cfg, ready=lambda url: print(url, flush=True)))\n"
    )
    log = (data.parent / "daemon.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(data), netns, json.dumps(extra or {})],
        stdout=subprocess.PIPE,
        stderr=log,
        env=dict(os.environ, HOME=str(home), PYTHONPATH=str(SRC), KILN_IMAGE_DIR=str(image_dir)),
    )
    log.close()
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    assert url.startswith("http://"), (data.parent / "daemon.log").read_text()
    return proc, url


@pytest.fixture
def own_netns() -> Iterator[str]:
    """A namespace of its own: the daemon's orphan cleanup must not see other tests' TAPs."""
    name = f"kiln-dmn-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_daemon_with_qemu_recovers_live_and_cold_vms(tmp_path: Path, own_netns: str) -> None:
    """kill -9 of the daemon: the running VM is re-adopted (memory and all), the
    stopped one comes back stopped and restores from its snapshot."""
    netns = own_netns
    data, home = tmp_path / "data", tmp_path / "home"
    home.mkdir()
    proc, url = _daemon(data, home, netns)
    procs = [proc]
    try:
        key = (data / "admin-api-key").read_text().strip()
        with httpx.Client(base_url=url, headers=_auth(key), timeout=300) as c:
            for name in ("survivor", "sleeper"):
                r = c.post("/sandboxes", json={"name": name})
                assert r.status_code == 201, r.text
                r = c.post(f"/sandboxes/{name}/exec", json={"cmd": ["sh", "-c", "echo 1 > /tmp/m"]})
                assert r.json()["exit_code"] == 0, r.text
            stopped = c.post("/sandboxes/sleeper/stop").json()
            assert (stopped["status"], stopped["thermal"]) == ("stopped", "cold")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        proc, url = _daemon(data, home, netns)
        procs.append(proc)
        with httpx.Client(base_url=url, headers=_auth(key), timeout=300) as c:
            sb = c.get("/sandboxes/survivor").json()
            assert (sb["status"], sb["thermal"]) == ("running", "hot")  # QEMU lived on
            out = c.post("/sandboxes/survivor/exec", json={"cmd": ["cat", "/tmp/m"]}).json()
            assert out["stdout"] == "1\n"  # the very same VM, memory and all
            sb = c.get("/sandboxes/sleeper").json()
            assert (sb["status"], sb["thermal"]) == ("stopped", "cold")
            started = c.post("/sandboxes/sleeper/start").json()
            assert (started["status"], started["thermal"]) == ("running", "hot")
            out = c.post("/sandboxes/sleeper/exec", json={"cmd": ["cat", "/tmp/m"]}).json()
            assert out["stdout"] == "1\n"  # /tmp lives in RAM: restored from the snapshot
            for name in ("survivor", "sleeper"):
                assert c.delete(f"/sandboxes/{name}").status_code == 204
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        _kill_vms(data)


@dataclass(frozen=True)
class OwnDaemon:
    """A daemon subprocess of its own (namespace, data directory, log)."""

    proc: subprocess.Popen[bytes]
    url: str
    data: Path

    def client(self) -> httpx.Client:
        key = (self.data / "admin-api-key").read_text().strip()
        return httpx.Client(base_url=self.url, headers=_auth(key), timeout=300)

    def log(self) -> str:
        return (self.data.parent / "daemon.log").read_text()


@pytest.fixture(scope="module")
def cooling_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnDaemon]:
    """A daemon whose thermal manager cools an idle VM within seconds, shared by the
    thermal and the expiry tests (one daemon start and one template boot for both).
    On SIGTERM at the end it must exit 0."""
    root = tmp_path_factory.mktemp("cooling")
    data, home = root / "data", root / "home"
    home.mkdir()
    netns = f"kiln-dmn-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    thermal = {"thermal": {"hot_to_warm_s": 1, "warm_to_cold_s": 2, "tick_s": 0.25}}
    try:
        proc, url = _daemon(data, home, netns, thermal)
        try:
            yield OwnDaemon(proc, url, data)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            _kill_vms(data)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)


@pytest.fixture
def cooling(cooling_daemon: OwnDaemon) -> Iterator[OwnDaemon]:
    """The shared cooling daemon; a test's sandboxes are deleted at its end."""
    yield cooling_daemon
    with cooling_daemon.client() as c:
        for sb in c.get("/sandboxes").json():
            assert c.delete(f"/sandboxes/{sb['id']}").status_code == 204


def _wait_thermal(c: httpx.Client, name: str, want: str, within: float) -> float:
    """Poll GET (which never wakes a sandbox) until ``thermal`` is ``want``."""
    start = time.monotonic()
    while True:
        sb = c.get(f"/sandboxes/{name}").json()
        if sb["thermal"] == want:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"still {sb['thermal']}, wanted {want}"
        time.sleep(0.25)


def test_thermal_manager_cools_an_idle_vm_and_a_request_wakes_it(cooling: OwnDaemon) -> None:
    """hot → warm → cold on second-scale timeouts, on a real VM; GETs never wake it,
    the next exec does (memory intact); keep_hot stops the cooling."""
    with cooling.client() as c:
        assert c.post("/sandboxes", json={"name": "idle"}).status_code == 201
        r = c.post("/sandboxes/idle/exec", json={"cmd": ["sh", "-c", "echo warm > /tmp/t"]})
        assert r.json()["exit_code"] == 0
        _wait_thermal(c, "idle", "warm", within=30)
        _wait_thermal(c, "idle", "cold", within=30)
        for _ in range(3):  # reads never wake it
            assert c.get("/sandboxes/idle").json()["thermal"] == "cold"
            assert c.get("/sandboxes").json()[0]["status"] == "running"
        out = c.post("/sandboxes/idle/exec", json={"cmd": ["cat", "/tmp/t"]}).json()
        assert out == {"exit_code": 0, "stdout": "warm\n", "stderr": ""}
        assert c.get("/sandboxes/idle").json()["thermal"] == "hot"

        assert c.patch("/sandboxes/idle", json={"keep_hot": True}).json()["keep_hot"] is True
        time.sleep(2.5)  # more than hot_to_warm_s plus a few ticks (six)
        assert c.get("/sandboxes/idle").json()["thermal"] == "hot"
        assert c.delete("/sandboxes/idle").status_code == 204


BACKGROUND_SCRIPTS = [
    "nohup sleep 1000 >/dev/null 2>&1 & echo $!",
    "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!",
    "(sleep 1000 </dev/null >/dev/null 2>&1 & echo $!)",
    "sleep 1000 >/tmp/bg.log 2>&1 & echo $!",
]


def test_exec_returns_while_background_children_run(vm: httpx.Client, box: str) -> None:
    """The regression: the sandbox user's commands start from a spawner, and a
    background child with redirected output used to hold the exec forever."""
    pids = []
    for script in BACKGROUND_SCRIPTS:
        started = time.monotonic()
        r = vm.post(f"/sandboxes/{box}/exec", json={"cmd": ["sh", "-c", script]}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["exit_code"] == 0
        assert time.monotonic() - started < 10, script
        pids.append(r.json()["stdout"].strip())
    alive = vm.post(
        f"/sandboxes/{box}/exec", json={"cmd": ["ps", "-o", "pid=", "-p", ",".join(pids)]}
    )
    assert sorted(alive.json()["stdout"].split()) == sorted(pids)
    # `X &` without redirects shares stdout: the exec ends when X does, with its output.
    r = vm.post(
        f"/sandboxes/{box}/exec", json={"cmd": ["sh", "-c", "(sleep 1; echo late) & echo early"]}
    )
    assert (r.json()["exit_code"], r.json()["stdout"]) == (0, "early\nlate\n")


def test_daemon_expires_real_vms_by_destroying_or_stopping_them(cooling: OwnDaemon) -> None:
    """ttl_s on real VMs: on_expire destroy frees the VM, stop snapshots it and keeps it."""
    with cooling.client() as c:
        r = c.post("/sandboxes", json={"name": "brief", "ttl_s": 1})
        assert r.status_code == 201, r.text
        r = c.post("/sandboxes", json={"name": "nap", "ttl_s": 1, "on_expire": "stop"})
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while c.get("/sandboxes/brief").status_code != 404:
            assert time.monotonic() < deadline, "not destroyed"
            time.sleep(0.2)
        while (nap := c.get("/sandboxes/nap").json())["status"] != "stopped":
            assert time.monotonic() < deadline, f"not stopped: {nap}"
            time.sleep(0.2)
        assert (nap["thermal"], nap["expires_at"]) == ("cold", None)
        assert [s["name"] for s in c.get("/sandboxes").json()] == ["nap"]
        assert len(find_processes(f"{cooling.data}/")) == 0  # neither VM runs any more
        out = c.post("/sandboxes/nap/exec", json={"cmd": ["true"]}).json()
        assert out["exit_code"] == 0  # stopped, not lost: it restores
        assert c.delete("/sandboxes/nap").status_code == 204
    log = cooling.log()
    assert "(brief) expired: destroyed" in log and "(nap) expired: stopped" in log


def _ndjson_until(r: httpx.Response, done: Callable[[list[dict[str, Any]]], bool]) -> list[Any]:
    events: list[dict[str, Any]] = []
    for line in r.iter_lines():
        if line:
            events.append(json.loads(line))
            if done(events):
                break
    return events


def _text(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(e["data"] for e in events if e["type"] == kind)


def test_background_process_survives_stop_and_start(
    vm: httpx.Client, vm_server: LiveServer
) -> None:
    """A background server in a real VM: started, listed, read by two readers at once,
    still the same running process after a snapshot to disk and a restore, then killed."""
    assert vm.post("/sandboxes", json={"name": "procs"}).status_code == 201
    try:
        cmd = ["python3", "-u", "-m", "http.server", "8000"]
        r = vm.post("/sandboxes/procs/processes", json={"cmd": cmd, "cwd": "/tmp"})
        assert r.status_code == 201, r.text
        proc = r.json()
        pid = proc["pid"]
        assert (proc["cmd"], proc["running"], proc["exit_code"]) == (cmd, True, None)
        listed = vm.get("/sandboxes/procs/processes").json()
        assert [p["pid"] for p in listed if not p["tty"]] == [pid]

        # It serves: a request through exec shows up in its log (stderr).
        fetch = (
            "python3 -c 'import urllib.request as u;"
            ' print(u.urlopen("http://127.0.0.1:8000/").status)\''
        )
        deadline = time.monotonic() + 60
        while True:
            out = vm.post("/sandboxes/procs/exec", json={"cmd": ["sh", "-c", fetch]}).json()
            if out["exit_code"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out["stdout"] == "200\n", out

        key: str = vm_server.key  # type: ignore[attr-defined]
        url = f"/sandboxes/procs/processes/{pid}/output"

        def served(events: list[dict[str, Any]]) -> bool:
            return '"GET / HTTP/1.1" 200' in _text(events, "stderr")

        with (
            httpx.Client(base_url=vm_server.url, headers=_auth(key), timeout=60) as other,
            vm.stream("GET", url) as first,
            other.stream("GET", url) as second,
        ):
            assert first.status_code == second.status_code == 200
            seen = [_ndjson_until(first, served), _ndjson_until(second, served)]
        assert _text(seen[0], "stdout") == _text(seen[1], "stdout")
        assert "Serving HTTP on" in _text(seen[0], "stdout")
        assert get_running(vm, pid)  # the readers left; the server did not

        r = vm.post("/sandboxes/procs/stop")
        assert r.json()["status"] == "stopped", r.text
        assert vm.post("/sandboxes/procs/start").json()["status"] == "running"
        after = vm.get(f"/sandboxes/procs/processes/{pid}").json()
        assert (after["pid"], after["running"], after["started_at"]) == (
            pid,
            True,
            proc["started_at"],
        )
        with vm.stream("GET", url) as r:
            replay = _ndjson_until(r, served)  # the kept output survived the restore
        assert "Serving HTTP on" in _text(replay, "stdout")

        # A fork has the same process, running, with its output, and serves too; it
        # is another machine (hostname, address); the two go on independently.
        exec_sh = {"cmd": ["sh", "-c", "echo mine > /tmp/mine; hostname"]}
        r = vm.post("/sandboxes/procs/fork", json={"name": "procs-fork"})
        assert r.status_code == 201, r.text
        copy = r.json()
        assert (copy["name"], copy["status"], copy["engine"]) == ("procs-fork", "running", "qemu")
        assert copy["ip"] != vm.get("/sandboxes/procs").json()["ip"]
        assert vm.post("/sandboxes/procs/fork", json={"name": "procs-fork"}).status_code == 409
        forked = vm.get(f"/sandboxes/procs-fork/processes/{pid}").json()
        assert (forked["running"], forked["started_at"]) == (True, proc["started_at"])
        out = vm.post("/sandboxes/procs-fork/exec", json={"cmd": ["sh", "-c", fetch]}).json()
        assert out["stdout"] == "200\n", out
        out = vm.post("/sandboxes/procs-fork/exec", json=exec_sh).json()
        assert out["stdout"] == "procs-fork\n", out
        out = vm.post("/sandboxes/procs/exec", json={"cmd": ["ls", "/tmp/mine"]}).json()
        assert out["exit_code"] != 0, out
        assert vm.delete("/sandboxes/procs-fork").status_code == 204
        assert get_running(vm, pid)

        r = vm.post(f"/sandboxes/procs/processes/{pid}/signal", json={"signal": "TERM"})
        assert r.status_code == 204, r.text
        with vm.stream("GET", url) as r:
            events = _ndjson_until(r, lambda ev: ev[-1]["type"] == "exit")
        assert events[-1] == {"type": "exit", "exit_code": 143}
        done = vm.get(f"/sandboxes/procs/processes/{pid}").json()
        assert (done["running"], done["exit_code"]) == (False, 143)
        assert done["finished_at"] is not None
        r = vm.post(f"/sandboxes/procs/processes/{pid}/signal", json={"signal": "KILL"})
        assert r.status_code == 409
    finally:
        vm.delete("/sandboxes/procs")


def get_running(vm: httpx.Client, pid: int) -> bool:
    r = vm.get(f"/sandboxes/procs/processes/{pid}")
    assert r.status_code == 200, r.text
    running: bool = r.json()["running"]
    return running
