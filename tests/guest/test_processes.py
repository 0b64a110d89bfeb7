"""The process table on the wire: what the host client does not exercise."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from kiln.protocol import FrameType

from ._wire import Conn, collect, process_alive, request, wait_for
from .conftest import Guest


async def start(guest: Guest, cmd: list[str], **fields: object) -> dict[str, object]:
    frame = await request(guest, FrameType.PROC_START, {"cmd": cmd, **fields})
    assert frame.type == FrameType.PROC_INFO, frame
    info: dict[str, object] = json.loads(frame.payload)
    return info


async def test_unknown_pid_gets_a_status_with_a_reason(guest: Guest) -> None:
    for ftype, payload in (
        (FrameType.PROC_ATTACH, {"pid": 999_999_999}),
        (FrameType.PROC_SIGNAL, {"pid": 999_999_999, "signal": "TERM"}),
    ):
        frame = await request(guest, ftype, payload)
        assert frame.type == FrameType.PROC_STATUS
        status = json.loads(frame.payload)
        assert (status["status"], status["reason"]) == ("error", "not_found")


@pytest.mark.parametrize(
    ("ftype", "payload", "message"),
    [
        (FrameType.PROC_START, {"cmd": []}, "'cmd' must be a non-empty list"),
        (FrameType.PROC_START, {"cmd": "ls"}, "'cmd' must be a non-empty list"),
        (FrameType.PROC_SIGNAL, {"pid": 1, "signal": "STOP"}, "unknown signal 'STOP'"),
        (FrameType.PROC_ATTACH, {"pid": -3}, "'pid' must be positive"),
        (FrameType.PROC_INPUT, {"pid": 1, "size": -1}, "'size' must not be negative"),
    ],
)
async def test_invalid_requests_get_an_error(
    guest: Guest, ftype: FrameType, payload: object, message: str
) -> None:
    frame = await request(guest, ftype, payload)
    assert frame.type == FrameType.ERROR
    assert message in frame.payload.decode()


async def test_input_cut_short_writes_nothing(guest: Guest) -> None:
    info = await start(guest, ["cat"])
    pid = int(str(info["pid"]))
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send_json(FrameType.PROC_INPUT, {"pid": pid, "size": 10})
        await conn.send(FrameType.STDIN, b"12345")
    # The next, complete input is all cat ever got.
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send_json(FrameType.PROC_INPUT, {"pid": pid, "size": 3, "close": True})
        await conn.send(FrameType.STDIN, b"ok\n")
        assert json.loads((await conn.expect(FrameType.PROC_STATUS)).payload) == {"status": "ok"}
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send_json(FrameType.PROC_ATTACH, {"pid": pid})
        await conn.expect(FrameType.PROC_INFO)
        result = await collect(conn)
    assert (result.stdout, result.code) == (b"ok\n", 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_as_another_user_with_a_background_child(guest: Guest) -> None:
    """Started through a spawner; its own background child does not hold the readers."""
    info = await start(
        guest, ["sh", "-c", "id -un; sleep 30 >/dev/null 2>&1 & echo $!"], user="nobody"
    )
    assert info["user"] == "nobody"
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send_json(FrameType.PROC_ATTACH, {"pid": info["pid"]})
        await conn.expect(FrameType.PROC_INFO)
        result = await collect(conn, within=3)
    name, child = result.stdout.decode().split()
    assert (name, result.code) == ("nobody", 0)
    assert process_alive(int(child))
    os.kill(int(child), 9)


async def test_agent_shutdown_kills_its_background_processes(
    make_agent: Callable[..., Guest],
) -> None:
    agent = make_agent(token=None)
    info = await start(agent, ["sleep", "30"])
    pid = int(str(info["pid"]))
    assert process_alive(pid)
    agent.proc.proc.terminate()
    agent.proc.proc.wait(5)
    await wait_for(lambda: not process_alive(pid))
