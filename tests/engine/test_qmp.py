"""The QMP adapter against a real QEMU (``-M none``: no guest, starts in ~50 ms)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.engine.errors import SandboxCrashed
from kiln.engine.qemu.qmp import QMP, QmpCommandError, connect_unix

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            assert proc.poll() is None, "QEMU exited"
            try:
                connect_unix(sock).close()  # listening, not just bound
                break
            except OSError:
                time.sleep(0.01)
        yield proc, sock
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()


async def test_execute_and_quit(qemu: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = qemu
    qmp = QMP("t", sock, timeout=5)
    await qmp.connect()
    assert qmp.connected
    status = await qmp.execute("query-status")
    assert status["status"] in ("prelaunch", "running", "paused")
    await qmp.quit()
    assert not qmp.connected
    assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_qemu_errors_become_command_errors(
    qemu: tuple[subprocess.Popen[bytes], Path],
) -> None:
    _, sock = qemu
    qmp = QMP("t", sock)
    await qmp.connect()
    with pytest.raises(QmpCommandError, match="no-such-command") as info:
        await qmp.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    assert (await qmp.execute("query-version"))["qemu"]["major"] >= 7  # still usable
    await qmp.close()


async def test_a_dead_qemu_is_a_crash(qemu: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = qemu
    qmp = QMP("t", sock)
    await qmp.connect()
    proc.kill()
    await asyncio.to_thread(proc.wait)
    with pytest.raises(SandboxCrashed, match="gone"):
        await qmp.execute("query-status")
    await qmp.close()
    await qmp.close()  # idempotent


async def test_a_hung_qemu_times_out(qemu: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = qemu
    qmp = QMP("t", sock, timeout=0.3)
    await qmp.connect()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(SandboxCrashed, match="did not answer"):
            await qmp.execute("query-status")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    await qmp.close()


async def test_no_socket_is_a_crash(tmp_path: Path) -> None:
    qmp = QMP("t", tmp_path / "missing.sock")
    with pytest.raises(SandboxCrashed):
        await qmp.connect()
    with pytest.raises(SandboxCrashed, match="no QMP connection"):
        await qmp.execute("query-status")


def test_long_socket_paths_are_reachable(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / f"{secrets.token_hex(4)}.sock"
    assert len(str(path)) > 108
    server = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(deep)  # bind needs a short path too
    try:
        server.bind(path.name)
    finally:
        os.chdir(cwd)
    server.listen(1)
    client = connect_unix(path)
    conn, _ = server.accept()
    client.close()
    conn.close()
    server.close()
