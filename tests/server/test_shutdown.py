"""``kiln serve`` stops within 10 s of SIGTERM, whatever it is doing, and leaves nothing running.

A real ``kiln serve`` process (the QEMU engine, TCG, no templates, its sandbox
network in a namespace of its own) on a fresh data dir and a fresh image dir,
so that it builds the default image right after it starts. The builder is
``tests/server/slow_builder.py`` (through ``$KILN_IMAGE_BUILDER``): the same
child-process path as the real build, the real image cache, and a sleeping
grandchild that ignores SIGTERM, as mmdebstrap does in some steps.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from kiln.images import list_images
from kiln.images.builder import load_image
from kiln.images.cache import TMP_PREFIX

SRC = Path(__file__).resolve().parents[2] / "src"
BUILDER = Path(__file__).with_name("slow_builder.py")
#: The promise: SIGTERM at any moment, and the daemon is gone within this.
EXIT_WITHIN_S = 10.0
BUILD_STARTED = re.compile(r"building in process group (\d+), sleeper (\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_group(pgid: int) -> list[int]:
    """Every living process whose process group is ``pgid`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


class Serve:
    """One ``kiln serve`` process of a test; its log in ``root/serve-N.log``."""

    def __init__(self, root: Path, netns: str, build_s: float, n: int) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = root / "kiln.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "data_dir": str(root / "data"),
                    "image_dir": str(root / "images"),
                    "listen": f"127.0.0.1:{self.port}",
                    "engine": "qemu",
                    "accel": "tcg",
                    "templates": False,
                    "pool": {"size": 0},
                    "network": {"netns": netns, "bridge": "ksd-br0", "subnet": "10.213.77.0/24"},
                }
            )
        )
        home = root / "home"
        home.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "HOME": str(home),
            "PYTHONPATH": str(SRC),
            "KILN_IMAGE_BUILDER": f"{sys.executable} {BUILDER}",
            "SLOW_BUILD_S": str(build_s),
        }
        for name in ("KILN_URL", "KILN_TOKEN", "KILN_IMAGE_DIR"):
            env.pop(name, None)
        self.log_path = root / f"serve-{n}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "serve", "--config", str(config)],
            env=env,
            stdout=self._log,
            stderr=self._log,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, within: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + within
        while True:
            found = re.search(pattern, self.log())
            if found:
                return found
            assert self.proc.poll() is None, f"kiln serve exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{self.log()}"
            time.sleep(0.05)

    def wait_health(self, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while True:
            assert self.proc.poll() is None, f"kiln serve exited:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"kiln serve did not answer:\n{self.log()}"
            time.sleep(0.05)

    def sigterm(self) -> tuple[int, float]:
        """SIGTERM; the exit status and the seconds it took (failing past the promise)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"kiln serve still runs {EXIT_WITHIN_S} s after SIGTERM:\n{self.log()}")
        return code, time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[type[Serve]]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/bootstrap installs it)")
    netns = f"ksd-{secrets.token_hex(3)}"
    started: list[Serve] = []

    class Started(Serve):
        def __init__(self, build_s: float) -> None:
            super().__init__(tmp_path, netns, build_s, len(started))
            started.append(self)

    try:
        yield Started
    finally:
        for s in started:
            s.close()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def _assert_clean_exit(daemon: Serve, code: int, took: float) -> None:
    log = daemon.log()
    assert code == 0, log
    assert took < EXIT_WITHIN_S
    assert "daemon stopped" in log
    assert "threads still running at exit" not in log, log
    assert "Traceback" not in log, log


def test_sigterm_mid_build_stops_the_build_and_a_restart_finishes_it(
    serve: type[Serve], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    first = serve(build_s=600)
    found = first.wait_log(BUILD_STARTED.pattern)
    pgid, sleeper = int(found[1]), int(found[2])
    assert sleeper in process_group(pgid)
    assert pgid != first.proc.pid  # the build's group is not the daemon's

    code, took = first.sigterm()
    print(f"SIGTERM mid-build: kiln serve exited in {took:.2f} s")
    _assert_clean_exit(first, code, took)
    assert "stopping the image build" in first.log()
    assert process_group(pgid) == [], "a process of the stopped build survived"
    # What the build left is a staging directory, which nothing takes for an image.
    assert list_images(images) == []
    partial = [p for p in (images / "images").iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(partial) == 1 and load_image(partial[0]) is None

    second = serve(build_s=0.2)
    second.wait_log(r"image minimal: ready")
    second.wait_log(r"default sandbox shape ready")
    second.wait_health()
    assert "removed leftover of an interrupted build" in second.log()
    built = list_images(images)
    assert [i.digest[:16] for i in built] == ["5555555555555555"]
    assert not [p for p in (images / "images").iterdir() if p.name.startswith(TMP_PREFIX)]

    code, took = second.sigterm()
    print(f"SIGTERM after the build: kiln serve exited in {took:.2f} s")
    _assert_clean_exit(second, code, took)


@pytest.mark.parametrize("moment", ["starting", "listening-mid-build", "serving"])
def test_sigterm_at_any_moment_exits_within_10_s(serve: type[Serve], moment: str) -> None:
    daemon = serve(build_s=600 if moment == "listening-mid-build" else 0.1)
    if moment == "starting":
        time.sleep(0.3)  # Python is still importing: before any handler is installed
    elif moment == "listening-mid-build":
        daemon.wait_health()
        daemon.wait_log(BUILD_STARTED.pattern)
    else:
        daemon.wait_log(r"default sandbox shape ready")
        key = (daemon.root / "data" / "admin-api-key").read_text().strip()
        with httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.post("/secrets", json={"name": "S", "value": "v"}).status_code == 201
            assert c.get("/sandboxes").json() == []
    code, took = daemon.sigterm()
    print(f"SIGTERM while {moment}: kiln serve exited in {took:.2f} s (status {code})")
    if moment == "starting" and code == -signal.SIGTERM:
        return  # killed by the signal's default action before Python set a handler: gone
    _assert_clean_exit(daemon, code, took)
    found = BUILD_STARTED.search(daemon.log())
    if found:
        assert process_group(int(found[1])) == []
