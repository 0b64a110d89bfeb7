"""Hostile and broken input: the agent answers ERROR (when it can), closes that
connection, and keeps serving. Every test ends by running a fresh exec on the
same agent, which is shared by the whole module (damage would accumulate)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
from collections.abc import Iterator

import pytest

from kiln.protocol import MAX_FRAME, FrameType

from ._wire import Conn, collect, exec_req, process_alive, raw_frame, run, wait_for
from .conftest import Guest, start_guest, stop_guest


@pytest.fixture(scope="module")
def agent() -> Iterator[Guest]:
    guest = start_guest("robust-token")
    try:
        yield guest
    finally:
        stop_guest(guest)


@pytest.fixture(autouse=True)
async def still_serving(agent: Guest) -> object:
    yield None
    assert agent.proc.proc.poll() is None, "the agent died"
    result = await run(agent, ["echo", "alive"])
    assert result.stdout == b"alive\n", result


async def authed(agent: Guest) -> Conn:
    return await Conn.open(agent.control, agent.token)


async def answer_then_close(conn: Conn) -> str | None:
    """The ERROR message, if the agent got one out, after which it must close."""
    frame = await conn.recv()
    if frame is None:
        return None
    assert frame.type == FrameType.ERROR, frame
    await conn.expect_closed()
    return frame.payload.decode()


@pytest.mark.parametrize("seed", range(5))
async def test_garbage_bytes(agent: Guest, seed: int) -> None:
    garbage = random.Random(seed).randbytes(4096)
    async with await authed(agent) as conn:
        await conn.send_raw(garbage)
        # Random bytes can happen to announce a plausible frame the agent then waits
        # for; the end of the stream makes every case decidable.
        conn.writer.write_eof()
        await answer_then_close(conn)


async def test_garbage_instead_of_auth(agent: Guest) -> None:
    async with await Conn.open(agent.control, None) as conn:
        await conn.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await answer_then_close(conn) is not None


async def test_zero_length_frame(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send_raw(b"\x00\x00\x00\x00")
        assert "length 0" in (await answer_then_close(conn) or "")


async def test_oversized_length_header(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send_raw(struct.pack(">IB", MAX_FRAME + 1, FrameType.EXEC_REQ) + b"x" * 1000)
        assert "limit" in (await answer_then_close(conn) or "")


async def test_oversized_auth_frame(agent: Guest) -> None:
    async with await Conn.open(agent.control, None) as conn:
        await conn.send_raw(struct.pack(">IB", 0xFFFFFFFF, FrameType.AUTH))
        assert await answer_then_close(conn) is not None


async def test_truncated_json(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send(FrameType.EXEC_REQ, b'{"cmd": ["echo", ')
        assert "JSON" in (await answer_then_close(conn) or "")


@pytest.mark.parametrize(
    "payload",
    [
        b'{"cmd": "echo"}',
        b"[]",
        b'{"cmd": ["echo"], "env": {"A": 1}}',
        b'{"cmd": ["echo"], "rows": -1, "tty": true}',
        b"\xff\xfe",
    ],
)
async def test_invalid_exec_request(agent: Guest, payload: bytes) -> None:
    async with await authed(agent) as conn:
        await conn.send(FrameType.EXEC_REQ, payload)
        assert await answer_then_close(conn)


@pytest.mark.parametrize(
    ("ftype", "payload"),
    [
        (FrameType.FILE_READ_REQ, {"path": ""}),
        (FrameType.FILE_WRITE_REQ, {"path": "x", "size": "big"}),
        (FrameType.FILE_STAT_REQ, {"nopath": 1}),
        (FrameType.EXEC_KILL, {}),
        (FrameType.CLOCK_SET, {"unix_ns": -5}),
    ],
)
async def test_invalid_requests(agent: Guest, ftype: FrameType, payload: object) -> None:
    async with await authed(agent) as conn:
        await conn.send_json(ftype, payload)
        assert await answer_then_close(conn)


async def test_unknown_frame_types_before_the_request_are_skipped(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send(0x7F, b"from the future")
        await conn.send(0xEE)
        await conn.send(FrameType.EXEC_REQ, exec_req(["echo", "ok"]))
        assert (await collect(conn)).stdout == b"ok\n"


async def test_unknown_frame_types_during_exec_are_skipped(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["cat"]))
        await conn.send(0x7E, b"?")
        await conn.send(FrameType.STDIN, b"data")
        await conn.send(FrameType.STDIN, b"")
        result = await collect(conn)
    assert (result.stdout, result.code) == (b"data", 0)


async def test_deeply_nested_json(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send(FrameType.EXEC_REQ, b"[" * 200_000 + b"]" * 200_000)
        assert await answer_then_close(conn)


async def test_known_non_request_before_the_request(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send(FrameType.STDIN, b"early")
        assert "expected a request" in (await answer_then_close(conn) or "")


async def test_second_request_during_exec_is_an_error_and_kills(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["sh", "-c", "echo $$; exec sleep 30"]))
        pid = int((await conn.expect(FrameType.STDOUT)).payload)
        await conn.send(FrameType.EXEC_REQ, exec_req(["true"]))
        assert "EXEC_REQ" in await conn.expect_error()
    await wait_for(lambda: not process_alive(pid))


async def test_huge_env_that_execve_takes(agent: Guest) -> None:
    env = {f"VAR{i}": "x" * 100_000 for i in range(9)}  # ~900 KB: fits a frame and execve
    result = await run(agent, ["sh", "-c", 'printf %s "$VAR8" | wc -c'], env=env)
    assert (result.stdout.strip(), result.code) == (b"100000", 0)


async def test_huge_env_that_execve_refuses(agent: Guest) -> None:
    env = {"BIG": "x" * 600_000}  # one string over the kernel's 128 KiB limit: E2BIG
    result = await run(agent, ["true"], env=env)
    assert result.code == 126
    assert b"too long" in result.stderr


async def test_bad_env_name_and_nul_in_argv(agent: Guest) -> None:
    assert (await run(agent, ["true"], env={"A=B": "x"})).error
    assert (await run(agent, ["echo", "a\x00b"])).error


async def test_disconnect_mid_frame(agent: Guest) -> None:
    conn = await authed(agent)
    await conn.send_raw(raw_frame(FrameType.EXEC_REQ, exec_req(["true"]))[:7])
    await conn.close()


async def test_connect_and_close_without_a_byte(agent: Guest) -> None:
    for _ in range(20):
        conn = await Conn.open(agent.control, None)
        await conn.close()


async def test_garbage_storm_alongside_real_work(agent: Guest) -> None:
    async def garbage() -> None:
        async with await authed(agent) as conn:
            await conn.send_raw(b"\xff" + os.urandom(2000))  # a length over the limit
            await answer_then_close(conn)

    async def work(i: int) -> bytes:
        return (await run(agent, ["echo", str(i)])).stdout

    results = await asyncio.gather(*(garbage() for _ in range(20)), *(work(i) for i in range(10)))
    assert results[20:] == [f"{i}\n".encode() for i in range(10)]


async def test_forward_socket_garbage(agent: Guest) -> None:
    async with await Conn.open(agent.forward, agent.token) as conn:
        await conn.send_raw(b"\x00\x00\x00\x05\x20{]]]")
        assert await answer_then_close(conn)


async def test_tty_attach_garbage(agent: Guest) -> None:
    async with await authed(agent) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["cat"], tty=True))
        sid = json.loads((await conn.expect(FrameType.SESSION_INFO)).payload)["session_id"]
        await conn.send(FrameType.RESIZE, b"\x00")  # RESIZE must be 4 bytes
        assert "RESIZE" in await conn.expect_error()
    async with await authed(agent) as conn:
        await conn.send_json(FrameType.EXEC_KILL, {"session_id": sid})
        await conn.expect(FrameType.EXIT)
