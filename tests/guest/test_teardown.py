"""How the agent ends a control connection once the operation is over.

After a request the host sends nothing more for (stat, read, write, ...), the
agent closes at once. After an exec, whose stdin the host may still be
sending, it lingers: it reads and drops input until the host closes, so that
closing on unread input (a TCP reset) cannot destroy the EXIT in flight.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from kiln.protocol import FrameType, encode_frame

from ._wire import Conn, collect, exec_req
from .conftest import Guest


async def write_keeps_working(conn: Conn, within: float) -> bool:
    """Whether the agent still takes our bytes for ``within`` seconds (it lingers)."""
    deadline = asyncio.get_running_loop().time() + within
    try:
        while asyncio.get_running_loop().time() < deadline:
            await conn.send_raw(b"x" * 1024)
            await asyncio.sleep(0.02)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


async def test_a_single_answer_request_closes_at_once(guest: Guest, workdir: Path) -> None:
    target = workdir / "f"
    target.write_bytes(b"content")
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(FrameType.FILE_STAT_REQ, json.dumps({"path": str(target)}).encode())
        await conn.expect(FrameType.FILE_STAT_RESP)
        await conn.expect_closed()
        assert not await write_keeps_working(conn, 0.3)


async def test_an_exec_lingers_for_stdin_still_on_its_way(guest: Guest) -> None:
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["true"]))
        result = await collect(conn)
        assert result.code == 0
        # The agent half-closed (we read EOF) but still reads what we send.
        await conn.expect_closed()
        assert await write_keeps_working(conn, 0.2)


async def test_extra_bytes_after_a_request_make_it_linger(guest: Guest, workdir: Path) -> None:
    """More than the one request frame arrived: the host may send more still."""
    target = workdir / "g"
    target.write_bytes(b"content")
    request = json.dumps({"path": str(target)}).encode()
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send_raw(
            encode_frame(FrameType.FILE_STAT_REQ, request) + encode_frame(FrameType.STDIN, b"extra")
        )
        await conn.expect(FrameType.FILE_STAT_RESP)
        await conn.expect_closed()
        assert await write_keeps_working(conn, 0.2)
