"""Activity, clock set and the session list of a fresh agent."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SRC
from kiln.guest.pid1 import rewrite
from kiln.protocol import FrameType

from ._wire import Conn, collect, exec_req, request, run
from .conftest import Guest


async def activity(agent: Any) -> dict[str, Any]:
    frame = await request(agent, FrameType.ACTIVITY_REQ)
    assert frame.type == FrameType.ACTIVITY_RESP
    data: dict[str, Any] = json.loads(frame.payload)
    return data


async def test_activity_fields_and_updates(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent()
    first = await activity(agent)
    assert set(first) == {"last_activity_unix", "attached_sessions", "running_sessions"}
    assert first["attached_sessions"] == 0 and first["running_sessions"] == 0
    assert abs(first["last_activity_unix"] - time.time()) < 60
    # Asking is not activity: the thermal manager polls this.
    assert (await activity(agent))["last_activity_unix"] == first["last_activity_unix"]
    before_exec = time.time()
    await run(agent, ["true"])
    assert (await activity(agent))["last_activity_unix"] >= before_exec


async def test_activity_counts_sessions_and_execs(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent()
    async with await Conn.open(agent.control, agent.token) as tty:
        await tty.send(FrameType.EXEC_REQ, exec_req(["cat"], tty=True))
        await tty.expect(FrameType.SESSION_INFO)
        async with await Conn.open(agent.control, agent.token) as piped:
            await piped.send(FrameType.EXEC_REQ, exec_req(["sh", "-c", "echo go; sleep 30"]))
            await piped.expect(FrameType.STDOUT)
            now = await activity(agent)
            assert now["attached_sessions"] == 2 and now["running_sessions"] == 2
    # Both connections closed: the piped exec is killed, the TTY session detached.
    deadline = time.monotonic() + 5
    while (now := await activity(agent))["attached_sessions"] or now["running_sessions"] != 1:
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.01)


async def test_stdin_counts_as_activity(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent()
    async with await Conn.open(agent.control, agent.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["cat"]))
        await conn.send(FrameType.STDIN, b"x")
        await conn.expect(FrameType.STDOUT)
        stamp = (await activity(agent))["last_activity_unix"]
        await conn.send(FrameType.STDIN, b"y")
        await conn.expect(FrameType.STDOUT)
        assert (await activity(agent))["last_activity_unix"] > stamp


async def test_clock_set_is_acknowledged_without_touching_the_clock(guest: Guest) -> None:
    before = time.time()
    far_past = 1_000_000_000 * 10**9
    frame = await request(guest, FrameType.CLOCK_SET, {"unix_ns": far_past, "seed": "00ff" * 16})
    assert frame.type == FrameType.CLOCK_SET_RESP
    assert json.loads(frame.payload) == {"status": "ok"}
    assert time.time() >= before  # test mode: acknowledged only


async def test_clock_set_rejects_a_bad_seed(guest: Guest) -> None:
    frame = await request(guest, FrameType.CLOCK_SET, {"unix_ns": 1, "seed": "not hex"})
    assert frame.type == FrameType.ERROR and b"seed" in frame.payload


async def test_fresh_agent_lists_no_sessions(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(token=None)
    frame = await request(agent, FrameType.EXEC_LIST_REQ)
    assert frame.type == FrameType.EXEC_LIST_RESP
    assert json.loads(frame.payload) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tcp_agent(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The agent in VM mode (TCP listeners) but not PID 1: no boot duties."""
    control, forward = free_port(), free_port()
    argv = [sys.executable, "-m", "kiln.guest", "--no-pid1", "--listen-host", "127.0.0.1"]
    argv += ["--control-port", str(control), "--forward-port", str(forward)]
    argv += ["--token", "tcp-token", "--workdir", str(tmp_path)]
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(SRC)))
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"agent exited with {proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", forward), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "agent did not listen"
                time.sleep(0.02)
        yield control, forward
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


async def test_vm_mode_serves_tcp(tcp_agent: tuple[int, int], tmp_path: Path) -> None:
    control, forward = tcp_agent
    async with await Conn.open_tcp("127.0.0.1", control, "tcp-token") as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["pwd"]))
        result = await collect(conn)
    assert (result.stdout, result.code) == (f"{tmp_path}\n".encode(), 0)
    async with await Conn.open_tcp("127.0.0.1", forward, "tcp-token") as conn:
        await conn.send_json(FrameType.FWD_REQ, {"port": control})  # forward to itself
        assert (await conn.expect_json(FrameType.FWD_RESP))["status"] == "ok"
        await conn.send(FrameType.AUTH, b"tcp-token")  # now spoken to the control port
        await conn.send(FrameType.EXEC_REQ, exec_req(["echo", "via-forward"]))
        assert (await collect(conn)).stdout == b"via-forward\n"


def test_rewrite_writes_over_in_place_and_cuts_to_length(tmp_path: Path) -> None:
    target = tmp_path / "hosts"
    rewrite(str(target), "127.0.0.1\tlocalhost\n127.0.1.1\ta-long-name\n")
    assert target.read_text() == "127.0.0.1\tlocalhost\n127.0.1.1\ta-long-name\n"
    assert target.stat().st_mode & 0o777 == 0o644
    inode = target.stat().st_ino
    rewrite(str(target), "short\n")  # shorter: the old tail is cut off
    assert target.read_text() == "short\n"
    rewrite(str(target), "a longer text than before\n")
    assert target.read_text() == "a longer text than before\n"
    assert target.stat().st_ino == inode  # the same file, written over
