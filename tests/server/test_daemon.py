"""The daemon process end to end: first start, SIGTERM, SIGKILL, restart.

The deep recovery cases are :mod:`tests.test_recovery`'s; these tests check the
wiring: a real ``serve()`` in a subprocess (store, key files, admin bootstrap,
recovery, thermal manager, uvicorn, signals) over the fake engine with real
agents, which, like VMs, outlive the daemon.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import pytest
import yaml

from fakes.engine import FakeEngine
from kiln.config import Config, ConfigError, load_config
from kiln.engine.qemu import QemuEngine
from kiln.images import ImageError, list_images
from kiln.images.child import BUILDER_ENV
from kiln.network import netns
from kiln.server.daemon import (
    DaemonError,
    ImageBuilder,
    UnavailableEngine,
    _warm_up,
    bind_socket,
    build_engine,
    build_firewall,
)
from kiln.server.services import Services
from kiln.store import Store

from .harness import kill_recorded_agents

MAIN = Path(__file__).with_name("daemon_main.py")
SLOW_BUILDER = Path(__file__).with_name("slow_builder.py")
SRC = Path(__file__).resolve().parents[2] / "src"


class Daemon:
    def __init__(self, data_dir: Path, home: Path, *extra: str) -> None:
        env = dict(os.environ, HOME=str(home), PYTHONPATH=str(SRC))
        self.log = (data_dir.parent / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(MAIN), str(data_dir), *extra],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("http://"):
            self.close()
            raise AssertionError(f"daemon did not start: {self.log_text(data_dir)}")
        self.url = line
        _started.append(self)

    @staticmethod
    def log_text(data_dir: Path) -> str:
        return (data_dir.parent / "daemon.log").read_text(errors="replace")

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"})

    def signal(self, signum: int, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.log.close()


_started: list[Daemon] = []


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    data, home = tmp_path / "data", tmp_path / "home"
    home.mkdir()
    try:
        yield data, home
    finally:
        while _started:
            _started.pop().close()
        kill_recorded_agents(data / "engine")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_bootstraps_admin_and_files(dirs: tuple[Path, Path]) -> None:
    data, home = dirs
    daemon = Daemon(data, home)
    try:
        key_file = data / "admin-api-key"
        key = key_file.read_text().strip()
        assert key.startswith("kiln_") and mode(key_file) == 0o600
        assert mode(data / "secret.key") == 0o600
        assert mode(data) == 0o700
        assert (data / "kiln.db").exists()
        client_cfg = home / ".kiln" / "config.yaml"
        assert mode(client_cfg) == 0o600
        assert yaml.safe_load(client_cfg.read_text()) == {"url": daemon.url, "token": key}
        health = httpx.get(f"{daemon.url}/health").json()
        assert health["status"] == "ok" and health["engine"] == "fake"
        with daemon.client(key) as c:
            assert c.get("/sandboxes").json() == []
    finally:
        assert daemon.signal(signal.SIGTERM) == 0


def test_existing_client_config_is_left_alone(dirs: tuple[Path, Path]) -> None:
    data, home = dirs
    (home / ".kiln").mkdir()
    (home / ".kiln" / "config.yaml").write_text("url: http://elsewhere:1\ntoken: mine\n")
    daemon = Daemon(data, home)
    daemon.signal(signal.SIGTERM)
    assert "elsewhere" in (home / ".kiln" / "config.yaml").read_text()
    assert (data / "admin-api-key").exists()


def test_sigterm_then_sigkill_keep_every_committed_row(dirs: tuple[Path, Path]) -> None:
    data, home = dirs
    daemon = Daemon(data, home)
    key = (data / "admin-api-key").read_text().strip()
    with daemon.client(key) as c:
        hot = c.post("/sandboxes", json={"name": "hot", "env": {"E": "v"}}).json()
        assert c.put("/sandboxes/hot/files?path=note", content=b"remember").status_code == 200
        cold = c.post("/sandboxes", json={"name": "cold"}).json()
        assert c.post("/sandboxes/cold/stop").json()["status"] == "stopped"
        gone = c.post("/sandboxes", json={"name": "gone"}).json()
        assert c.delete("/sandboxes/gone").status_code == 204
        assert c.post("/secrets", json={"name": "S", "value": "v"}).status_code == 201
        assert c.post("/templates", json={"name": "t"}).status_code == 201
        assert c.post("/volumes", json={"name": "vol", "size_mb": 8}).status_code == 201
    assert daemon.signal(signal.SIGTERM) == 0
    assert "shutting down" in Daemon.log_text(data)

    def check(d: Daemon) -> None:
        with d.client(key) as c:  # the same key: no second bootstrap
            listed = {s["name"]: s for s in c.get("/sandboxes").json()}
            assert set(listed) == {"hot", "cold"}
            assert listed["hot"]["id"] == hot["id"] and listed["hot"]["status"] == "running"
            assert listed["cold"]["id"] == cold["id"] and listed["cold"]["status"] == "stopped"
            assert c.get(f"/sandboxes/{gone['id']}").status_code == 404
            out = c.post("/sandboxes/hot/exec", json={"cmd": ["sh", "-c", "echo $E"]}).json()
            assert out["stdout"] == "v\n"
            assert c.get("/sandboxes/hot/files?path=note").content == b"remember"
            assert [s["name"] for s in c.get("/secrets").json()] == ["S"]
            assert [t["name"] for t in c.get("/templates").json()] == ["t"]
            assert [v["name"] for v in c.get("/volumes").json()] == ["vol"]

    second = Daemon(data, home)
    check(second)
    with second.client(key) as c:
        extra = c.post("/sandboxes", json={"name": "late"}).json()
    # A crash: nothing gets to shut down cleanly.
    assert second.signal(signal.SIGKILL) == -signal.SIGKILL

    third = Daemon(data, home)
    try:
        check_names = {"hot", "cold", "late"}
        with third.client(key) as c:
            assert {s["name"] for s in c.get("/sandboxes").json()} == check_names
            assert c.get("/sandboxes/late").json()["id"] == extra["id"]
            assert c.post("/sandboxes/cold/start").json()["status"] == "running"
            assert c.post("/sandboxes/late/exec", json={"cmd": ["true"]}).json()["exit_code"] == 0
    finally:
        assert third.signal(signal.SIGTERM) == 0
    with Store.open(data / "kiln.db") as store:
        assert store.integrity_check() == []
        assert store.count_sandboxes() == 3


def test_sigterm_with_an_open_stream_exits_promptly(dirs: tuple[Path, Path]) -> None:
    data, home = dirs
    daemon = Daemon(data, home)
    key = (data / "admin-api-key").read_text().strip()
    with daemon.client(key) as c:
        c.post("/sandboxes", json={"name": "s"})
        with c.stream(
            "POST",
            "/sandboxes/s/exec",
            json={"cmd": ["sh", "-c", "echo go; sleep 60"]},
            headers={"Accept": "application/x-ndjson"},
        ) as r:
            next(r.iter_lines())
            start = time.monotonic()
            assert daemon.signal(signal.SIGTERM, timeout=20) == 0
    assert time.monotonic() - start < 10


def _wait_for(check: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``check`` until true; return how long it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"{what}: not within {within} s"
        time.sleep(0.1)
    return time.monotonic() - start


def test_expired_sandboxes_are_destroyed_or_stopped(dirs: tuple[Path, Path]) -> None:
    data, home = dirs
    daemon = Daemon(data, home)
    try:
        key = (data / "admin-api-key").read_text().strip()
        with daemon.client(key) as c:
            doomed = c.post("/sandboxes", json={"name": "doomed", "ttl_s": 1}).json()
            c.post("/sandboxes", json={"name": "nap", "ttl_s": 1, "on_expire": "stop"})
            c.post("/sandboxes", json={"name": "stays", "ttl_s": 3600})
            _wait_for(lambda: c.get("/sandboxes/doomed").status_code == 404, 8, "destroy")
            _wait_for(lambda: c.get("/sandboxes/nap").json()["status"] == "stopped", 8, "stop")
            nap = c.get("/sandboxes/nap").json()
            assert nap["expires_at"] is None  # stopped, still listed, no longer expiring
            assert {s["name"] for s in c.get("/sandboxes").json()} == {"nap", "stays"}
            # The stopped one is a normal sandbox again: it starts and runs.
            assert c.post("/sandboxes/nap/start").json()["status"] == "running"
            assert c.post("/sandboxes/nap/exec", json={"cmd": ["true"]}).json()["exit_code"] == 0
    finally:
        assert daemon.signal(signal.SIGTERM) == 0
    log = Daemon.log_text(data)
    assert f"sandbox {doomed['id']} (doomed) expired: destroyed" in log
    assert "(nap) expired: stopped" in log


def test_a_sandbox_that_expired_while_the_daemon_was_down_goes_at_start(
    dirs: tuple[Path, Path],
) -> None:
    data, home = dirs
    daemon = Daemon(data, home)
    key = (data / "admin-api-key").read_text().strip()
    with daemon.client(key) as c:
        gone = c.post("/sandboxes", json={"name": "gone", "ttl_s": 4}).json()
        c.post("/sandboxes", json={"name": "nap", "ttl_s": 4, "on_expire": "stop"})
    assert daemon.signal(signal.SIGTERM) == 0
    with Store.open(data / "kiln.db") as store:
        rows = store.list_expiring()
        assert [r.name for r in rows] == ["gone", "nap"]  # not yet expired when it stopped
        deadline = max(r.expires_at or 0.0 for r in rows)
    time.sleep(max(0.0, deadline - time.time()) + 0.2)

    second = Daemon(data, home)
    try:
        with second.client(key) as c:
            _wait_for(lambda: c.get("/sandboxes/gone").status_code == 404, 5, "destroy at start")
            _wait_for(lambda: c.get("/sandboxes/nap").json()["status"] == "stopped", 5, "stop")
            assert c.get("/sandboxes/nap").json()["expires_at"] is None
    finally:
        assert second.signal(signal.SIGTERM) == 0
    assert f"sandbox {gone['id']} (gone) expired: destroyed" in Daemon.log_text(data)


def test_without_an_engine_the_api_answers_503(dirs: tuple[Path, Path]) -> None:
    data, home = dirs
    daemon = Daemon(data, home, "--unavailable")
    try:
        key = (data / "admin-api-key").read_text().strip()
        assert httpx.get(f"{daemon.url}/health").json()["engine"] == "none"
        with daemon.client(key) as c:
            r = c.post("/sandboxes", json={})
            assert r.status_code == 503
            assert "no engine" in r.json()["error"]
            assert c.get("/sandboxes").json() == []
            assert c.post("/secrets", json={"name": "A", "value": "b"}).status_code == 201
    finally:
        daemon.signal(signal.SIGTERM)


def test_engine_auto_without_qemu_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-system-x86_64 (nor dockerd) on it
    engines = build_engine(load_config(None, {"data_dir": str(tmp_path)}))
    assert engines.name == "qemu"
    available = engines.available()
    assert "qemu-system-x86_64" in (available["qemu"] or "")
    assert "dockerd is not installed" in (available["docker"] or "")
    assert isinstance(engines.get("qemu"), UnavailableEngine)


def test_address_in_use_is_a_clear_error() -> None:
    first = bind_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(DaemonError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        first.close()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "kiln.yaml"
    path.write_text("listen: nowhere\n")
    with pytest.raises(ConfigError, match="listen"):
        load_config(path)


def _warm_up_services(
    engine: FakeEngine, built: list[str], fail: Exception | None, config: Config | None = None
) -> Services:
    async def images(tier: str) -> None:
        built.append(tier)
        if fail is not None:
            raise fail

    config = config or load_config(None)
    return cast(Services, SimpleNamespace(images=images, engine=engine, config=config))


def test_warm_up_prepares_the_default_shape() -> None:
    engine, built = FakeEngine(), []
    asyncio.run(_warm_up(_warm_up_services(engine, built, None)))
    assert built == ["minimal"]
    assert [(s.image, s.cpus, s.memory_mb) for s in engine.prepared] == [("minimal", 1, 512)]


def test_warm_up_prepares_every_pooled_shape(tmp_path: Path) -> None:
    path = tmp_path / "kiln.yaml"
    path.write_text(
        "pool:\n  shapes:\n  - {cpus: 2, memory_mb: 1024}\n  - {memory_mb: 256, size: 3}\n"
    )
    engine, built = FakeEngine(), []
    asyncio.run(_warm_up(_warm_up_services(engine, built, None, load_config(path))))
    assert built == ["minimal"] * 3
    assert [(s.image, s.cpus, s.memory_mb) for s in engine.prepared] == [
        ("minimal", 1, 512),
        ("minimal", 2, 1024),
        ("minimal", 1, 256),
    ]


def test_a_failed_warm_up_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    engine, built = FakeEngine(), []
    asyncio.run(_warm_up(_warm_up_services(engine, built, OSError("disk full"))))
    assert engine.prepared == [] and "warm-up of minimal" in caplog.text
    assert "failed" in caplog.text and "disk full" in caplog.text


def test_the_qemu_engine_gets_the_template_setting(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    for templates, aslr in ((True, "auto"), (False, "off")):
        overrides = {"data_dir": str(tmp_path), "templates": templates, "guest_aslr": aslr}
        engine = build_engine(load_config(None, overrides)).get("qemu")
        assert isinstance(engine, QemuEngine)
        assert (engine.config.templates, engine.config.guest_aslr) == (templates, aslr)
        assert (engine.config.pool_size, engine.config.pool_memory_mb) == (2, 2048)
    overrides = {"data_dir": str(tmp_path), "pool.size": 0, "pool.memory_mb": 512}
    engine = build_engine(load_config(None, overrides)).get("qemu")
    assert isinstance(engine, QemuEngine)
    assert (engine.config.pool_size, engine.config.pool_memory_mb) == (0, 512)
    path = tmp_path / "kiln.yaml"
    path.write_text(f"data_dir: {tmp_path}\npool: {{shapes: [{{cpus: 2, memory_mb: 1024}}]}}\n")
    engine = build_engine(load_config(path)).get("qemu")
    assert isinstance(engine, QemuEngine)
    assert engine.config.pool_shapes == (("minimal", 2, 1024, 1),)
    assert engine.config.pool_size_for("minimal", 2, 1024) == 1
    assert engine.config.pool_size_for("minimal", 1, 512) == 2
    assert engine.config.pool_size_for("minimal", 4, 512) == 2


def _serve_with_bare_path(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``kiln serve`` with a PATH holding python and nothing else (no dockerd, no nft)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = dict(os.environ, HOME=str(tmp_path), PATH=str(bin_dir), PYTHONPATH=str(SRC))
    argv = ["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0", *extra]
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_with_docker_as_default_and_no_dockerd_says_how_to_get_one(tmp_path: Path) -> None:
    config = tmp_path / "kiln.yaml"
    config.write_text("firewall: {enabled: false}\n")
    done = _serve_with_bare_path(tmp_path, "--engine", "docker", "--config", str(config))
    assert done.returncode == 1
    assert "dockerd is not installed" in done.stderr
    assert "apt-get install docker.io" in done.stderr
    assert "firewall.enabled is false" in done.stderr, "the daemon warns about that"


def test_without_nft_the_daemon_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(netns, "SBIN_DIRS", ())
    config = load_config(None, {"data_dir": str(tmp_path)})
    with pytest.raises(DaemonError) as caught:
        build_firewall(config)
    message = str(caught.value)
    assert "cannot install the sandbox firewall" in message
    assert "apt-get install nftables" in message and "firewall.enabled: false" in message


def test_admin_tools_are_found_outside_a_users_path(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/usr/sbin/nft").exists():
        pytest.skip("nft is not installed in /usr/sbin")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a user's shell, a minimal service
    assert netns.find_tool("nft") == "/usr/sbin/nft"


def test_closing_the_image_builder_stops_the_build_and_answers_its_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BUILDER_ENV, f"{sys.executable} {SLOW_BUILDER}")
    monkeypatch.setenv("SLOW_BUILD_S", "600")

    async def main() -> None:
        builder = ImageBuilder(tmp_path)
        first = asyncio.create_task(builder("minimal"))
        second = asyncio.create_task(builder("minimal"))
        await asyncio.sleep(0.5)
        first.cancel()  # a request that gives up does not stop the build the other waits for
        await asyncio.sleep(0.5)
        assert not second.done()
        await builder.close()
        with pytest.raises(ImageError, match="stopped: the daemon is shutting down"):
            await second
        with pytest.raises(ImageError, match="the daemon is shutting down"):
            await builder("minimal")

    asyncio.run(main())
    assert list_images(tmp_path) == []
