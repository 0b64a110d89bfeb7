"""The CLI against ``kiln serve`` on the real QEMU engine (microVMs).

The daemon's sandbox network lives in a network namespace this module creates
(``network.netns`` in the daemon config) and deletes at the end. Every sandbox
is destroyed through the CLI; QEMU processes left behind (found by the data
directory on their command line) are killed before the namespace goes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from kiln.engine.qemu.process import find_processes
from kiln.images import default_image_dir

from .conftest import Cli, kiln_argv

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (TAP devices, network namespaces)"
    for tool in ("qemu-system-x86_64", "ip", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def vm_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """``kiln serve`` (QEMU engine, sandbox network in a new netns) and a CLI pointed at it."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    netns = f"kc-{secrets.token_hex(4)}"
    made = _ip("netns", "add", netns)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    root = tmp_path_factory.mktemp("vm-cli")
    home = root / "home"
    home.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = root / "kiln.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(root / "data"),
                # HOME is replaced below: keep the shared image cache (built by scripts/test).
                "image_dir": str(default_image_dir()),
                "listen": f"127.0.0.1:{port}",
                "network": {"netns": netns, "bridge": "kc-br0", "subnet": "10.213.9.0/24"},
                "pool": {"size": 0},  # no extra VMs on the test box
            }
        )
    )
    env = {**os.environ, "HOME": str(home)}
    env.pop("KILN_URL", None)
    env.pop("KILN_TOKEN", None)
    log = (root / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [*kiln_argv(), "serve", "--config", str(config)], env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert daemon.poll() is None, (root / "daemon.log").read_text()
            assert time.monotonic() < deadline, "kiln serve did not answer /health"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # The daemon's first start wrote ~/.kiln/config.yaml: no URL or key to pass.
        yield Cli(home)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        for pid in find_processes(f"{root}/"):
            os.kill(pid, signal.SIGKILL)
        _ip("netns", "del", netns)


@pytest.fixture(scope="module")
def vm_sandbox(vm_cli: Cli) -> Iterator[str]:
    """One microVM for the module's tests (a TCG boot is the expensive part)."""
    name = f"vm-{secrets.token_hex(3)}"
    proc = vm_cli("create", "--name", name, "--memory", "512", "-e", "WHO=vm", timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    try:
        yield name
    finally:
        vm_cli.ok("rm", name)


def test_cli_on_a_real_microvm(vm_cli: Cli, vm_sandbox: str) -> None:
    name = vm_sandbox
    assert vm_cli.ok("exec", name, "--", "sh", "-c", "echo $WHO; uname -s") == "vm\nLinux\n"
    assert vm_cli("exec", name, "--", "sh", "-c", "exit 7").returncode == 7
    both = vm_cli("exec", name, "--", "sh", "-c", "echo out; echo err >&2")
    assert (both.stdout, both.stderr) == (b"out\n", b"err\n")
    data = b"\x00\xff" * 50_000
    piped = vm_cli("exec", name, "--", "sha256sum", input=data)
    assert piped.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    vm_cli.ok("file", "write", name, "/workspace/hello.txt", "-", input=b"hi from the host\n")
    assert vm_cli.ok("file", "read", name, "/workspace/hello.txt") == "hi from the host\n"
    assert "hello.txt" in vm_cli.ok("file", "ls", name, "/workspace")
    assert vm_cli.ok("exec", name, "--", "cat", "/workspace/hello.txt") == "hi from the host\n"
    assert vm_cli.ok("exec", name, "--", "id", "-un") == "sandbox\n"
    assert vm_cli.ok("exec", "-u", "root", name, "--", "id", "-un") == "root\n"
    # Piped stdin is uploaded as the sandbox user's file; root reads it all the same.
    assert vm_cli.ok("exec", "--user", "root", name, "--", "wc", "-c", input=b"12345") == "5\n"

    copy = json.loads(vm_cli.ok("fork", name, "--name", f"{name}-2", "--json"))
    assert (copy["name"], copy["status"]) == (f"{name}-2", "running")
    out = vm_cli.ok("exec", f"{name}-2", "--", "sh", "-c", "cat /workspace/hello.txt; hostname")
    assert out == f"hi from the host\n{name}-2\n"
    vm_cli.ok("rm", f"{name}-2")


def _tree_of(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under ``root``: its mode and its content (a symlink: its target)."""
    out: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirs, files in os.walk(root):
        for entry in dirs + files:
            path = Path(dirpath) / entry
            mode = path.lstat().st_mode
            if path.is_symlink():
                body = os.readlink(path).encode()
            elif path.is_dir():
                body = b""
            else:
                body = path.read_bytes()
            out[str(path.relative_to(root))] = (mode, body)
    return out


def test_cp_round_trips_a_tree_through_a_microvm(
    vm_cli: Cli, vm_sandbox: str, tmp_path: Path
) -> None:
    name = vm_sandbox
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "bin" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "bin" / "run.sh").chmod(0o755)
    big = os.urandom(5 << 20)
    (tree / "big.bin").write_bytes(big)
    (tree / "run").symlink_to("bin/run.sh")
    vm_cli.ok("cp", "-q", str(tree), f"{name}:/workspace/")
    listing = vm_cli.ok(
        "exec", name, "--", "sh", "-c",
        "cd /workspace/tree && stat -c '%n %U %a %F' bin/run.sh empty run && readlink run"
        " && ./run && sha256sum big.bin",
    )  # fmt: skip
    assert listing.splitlines() == [
        "bin/run.sh sandbox 755 regular file",
        "empty sandbox 755 directory",
        "run sandbox 777 symbolic link",
        "bin/run.sh",
        "ran",
        f"{hashlib.sha256(big).hexdigest()}  big.bin",
    ]
    out = tmp_path / "out"
    vm_cli.ok("cp", f"{name}:/workspace/tree", str(out))
    assert _tree_of(out) == _tree_of(tree)

    missing = vm_cli("cp", f"{name}:/workspace/no-such", str(tmp_path / "x"))
    assert missing.returncode == 3, missing.stderr.decode()
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("../escaped"), io.BytesIO(b""))
    refused = vm_cli("cp", "-", f"{name}:/workspace", input=evil.getvalue())
    assert refused.returncode == 1 and b"'..'" in refused.stderr, refused.stderr.decode()
    assert vm_cli("exec", name, "--", "test", "-e", "/escaped").returncode == 1
