"""Authentication: the first frame must be AUTH with the token, within the deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from kiln.guest.__main__ import build_parser
from kiln.protocol import FrameType

from ._wire import Conn, collect, exec_req, run
from .conftest import Guest


async def test_right_token_is_accepted(guest: Guest) -> None:
    assert (await run(guest, ["true"])).code == 0


async def test_wrong_token_is_refused(guest: Guest, workdir: Path) -> None:
    async with await Conn.open(guest.control, "0" * 32) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["touch", str(workdir / "ran")]))
        assert "authentication failed" in await conn.expect_error()
        await conn.expect_closed()
    assert not (workdir / "ran").exists()


async def test_missing_auth_is_refused(guest: Guest, workdir: Path) -> None:
    async with await Conn.open(guest.control, None) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["touch", str(workdir / "ran")]))
        assert "authentication required" in await conn.expect_error()
        await conn.expect_closed()
    assert not (workdir / "ran").exists()


async def test_late_auth_is_refused(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(token="tok", extra=["--auth-timeout", "0.3"])
    start = time.monotonic()
    async with await Conn.open(agent.control, None) as conn:
        assert "timed out" in await conn.expect_error(within=5)
        await conn.expect_closed()
        assert 0.25 < time.monotonic() - start < 3
    assert (await run(agent, ["true"])).code == 0  # a prompt client is still served


async def test_auth_split_across_writes_within_deadline(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(token="tok", extra=["--auth-timeout", "1"])
    async with await Conn.open(agent.control, None) as conn:
        frame = b"\x00\x00\x00\x04\x11tok"
        for byte in frame:
            await conn.send_raw(bytes([byte]))
            await asyncio.sleep(0.01)
        await conn.send(FrameType.EXEC_REQ, exec_req(["echo", "ok"]))
        assert (await collect(conn)).stdout == b"ok\n"


def test_default_auth_deadline_is_five_seconds() -> None:
    assert build_parser().parse_args(["--test-mode", "--socket-dir", "/tmp"]).auth_timeout == 5.0


async def test_without_a_token_no_auth_is_needed(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(token=None)
    assert (await run(agent, ["echo", "open"])).stdout == b"open\n"
    # An AUTH frame, if sent anyway, is accepted and ignored.
    async with await Conn.open(agent.control, "anything") as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["echo", "still"]))
        assert (await collect(conn)).stdout == b"still\n"
