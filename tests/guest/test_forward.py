"""Port forwarding through the forward socket to a TCP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator

import pytest

from kiln.protocol import FrameType, encode_frame

from ._wire import Conn
from .conftest import Guest


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP echo server on 127.0.0.1; on the client's EOF it sends b"bye" and closes."""
    handlers: set[asyncio.Task[object]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(b"bye")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port
    for task in handlers:
        task.cancel()
    if handlers:
        await asyncio.wait(handlers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def open_forward(agent: Guest, port: int) -> tuple[Conn, dict[str, str]]:
    conn = await Conn.open(agent.forward, agent.token)
    await conn.send_json(FrameType.FWD_REQ, {"port": port})
    answer = await conn.expect_json(FrameType.FWD_RESP)
    return conn, answer


async def read_exactly(conn: Conn, n: int) -> bytes:
    async with asyncio.timeout(10):
        return await conn.reader.readexactly(n)


async def test_relay_both_ways(guest: Guest, echo_port: int) -> None:
    conn, answer = await open_forward(guest, echo_port)
    async with conn:
        assert answer == {"status": "ok"}
        await conn.send_raw(b"ping")
        assert await read_exactly(conn, 4) == b"ping"
        big = os.urandom(2 * 1024 * 1024)

        async def send_big() -> None:
            await conn.send_raw(big)

        _sent, echoed = await asyncio.gather(send_big(), read_exactly(conn, len(big)))
        assert echoed == big


async def test_half_close_reaches_the_server(guest: Guest, echo_port: int) -> None:
    conn, _answer = await open_forward(guest, echo_port)
    async with conn:
        await conn.send_raw(b"last words")
        conn.writer.write_eof()
        async with asyncio.timeout(10):
            rest = await conn.reader.read()  # until the server closes
    assert rest == b"last wordsbye"


async def test_bytes_right_behind_fwd_req_are_relayed(guest: Guest, echo_port: int) -> None:
    async with await Conn.open(guest.forward, guest.token) as conn:
        request = encode_frame(FrameType.FWD_REQ, json.dumps({"port": echo_port}).encode())
        await conn.send_raw(request + b"early bytes")  # one write: decoder holds them
        assert (await conn.expect_json(FrameType.FWD_RESP))["status"] == "ok"
        assert await read_exactly(conn, 11) == b"early bytes"


async def test_closed_port_is_an_error_response(guest: Guest) -> None:
    conn, answer = await open_forward(guest, free_port())
    async with conn:
        assert answer["status"] == "error"
        assert "refused" in answer["message"].lower()


async def test_forward_needs_fwd_req(guest: Guest) -> None:
    async with await Conn.open(guest.forward, guest.token) as conn:
        await conn.send(FrameType.EXEC_LIST_REQ)
        assert "FWD_REQ" in await conn.expect_error()


async def test_forward_rejects_a_bad_port(guest: Guest) -> None:
    async with await Conn.open(guest.forward, guest.token) as conn:
        await conn.send_json(FrameType.FWD_REQ, {"port": 70000})
        assert "port" in await conn.expect_error()


async def test_forward_requires_auth(guest: Guest, echo_port: int) -> None:
    async with await Conn.open(guest.forward, "wrong-token") as conn:
        await conn.send_json(FrameType.FWD_REQ, {"port": echo_port})
        assert "authentication" in await conn.expect_error()
        await conn.expect_closed()
