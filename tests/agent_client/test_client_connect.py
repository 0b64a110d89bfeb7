"""Connecting, authenticating, forwarding, activity and clock."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kiln.agent_client import (
    AgentClient,
    AgentConnectError,
    AgentTimeout,
    AuthError,
    Endpoint,
    ForwardError,
    tcp_dialer,
    unix_dialer,
)

from .helpers import file_text, serve

if TYPE_CHECKING:
    from tests.conftest import AgentProcess


# -- connecting -------------------------------------------------------------------------


async def test_missing_socket_fails_fast(tmp_path: Path) -> None:
    client = AgentClient.unix_dir(tmp_path / "nowhere", "t" * 32, connect_timeout=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AgentConnectError) as info:
        await client.exec(["true"])
    assert loop.time() - started < 0.5
    assert isinstance(info.value.__cause__, OSError)


async def test_connect_timeout_with_an_injected_dialer() -> None:
    async def never() -> socket.socket:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    client = AgentClient(Endpoint(never, never, "nowhere"), None, connect_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AgentConnectError, match="timed out"):
        await client.activity()
    assert loop.time() - started < 2


@pytest.fixture
async def silent_server() -> AsyncIterator[Path]:
    """Unix sockets that accept and read but never answer (a hung agent)."""
    sock_dir = Path("/tmp") / f"kc-{secrets.token_hex(4)}"
    sock_dir.mkdir()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    try:
        async with (
            serve(swallow, sock_dir / "control.sock"),
            serve(swallow, sock_dir / "forward.sock"),
        ):
            yield sock_dir
    finally:
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


async def test_auth_timeout_when_the_agent_never_answers(silent_server: Path) -> None:
    client = AgentClient.unix_dir(silent_server, "t" * 32, auth_timeout=0.3)
    with pytest.raises(AgentTimeout):
        await client.stat("/")
    with pytest.raises(AgentTimeout):
        await client.forward(80)


async def test_wait_ready(client: AgentClient, tmp_path: Path) -> None:
    await client.wait_ready(timeout=5)
    missing = AgentClient.unix_dir(tmp_path / "nowhere", None, connect_timeout=0.1)
    with pytest.raises(AgentTimeout):
        await missing.wait_ready(timeout=0.3)


async def test_injected_dialers(agent: AgentProcess) -> None:
    calls: list[str] = []
    control, forward = unix_dialer(agent.control), unix_dialer(agent.forward)

    async def counting_control() -> socket.socket:
        calls.append("control")
        return await control()

    client = AgentClient(Endpoint(counting_control, forward), agent.token)
    assert (await client.exec(["echo", "via dialer"])).stdout == b"via dialer\n"
    assert calls == ["control"]


async def test_tcp_dialer_with_socket_factory() -> None:
    made: list[int] = []

    def factory(family: int) -> socket.socket:
        made.append(family)
        return socket.socket(family, socket.SOCK_STREAM)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()

    async with serve(echo) as port:
        with await tcp_dialer("127.0.0.1", port, factory)() as sock:
            assert not sock.getblocking()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"ping")
            assert await loop.sock_recv(sock, 100) == b"ping"
    assert made == [socket.AF_INET]


# -- authentication -----------------------------------------------------------------------


async def test_wrong_token_is_auth_error(agent: AgentProcess) -> None:
    bad = AgentClient.unix_dir(agent.socket_dir, secrets.token_hex(16), auth_timeout=5)
    with pytest.raises(AuthError):
        await bad.exec(["true"])
    with pytest.raises(AuthError):
        await bad.stat("/")
    with pytest.raises(AuthError):
        await bad.list_sessions()
    with pytest.raises(AuthError):
        await bad.forward(80)
    target = Path("/tmp") / f"kiln-never-written-{secrets.token_hex(4)}"
    with pytest.raises(AuthError):
        await bad.write_file(str(target), b"x" * 1000)
    assert not file_text(target)


async def test_missing_token_is_auth_error(agent: AgentProcess) -> None:
    anonymous = AgentClient.unix_dir(agent.socket_dir, None, auth_timeout=10)
    with pytest.raises(AuthError):
        await anonymous.activity()


async def test_right_token_after_a_wrong_one(agent: AgentProcess, client: AgentClient) -> None:
    bad = AgentClient.unix_dir(agent.socket_dir, "0" * 32)
    with pytest.raises(AuthError):
        await bad.activity()
    assert (await client.exec(["true"])).ok


# -- forwarding -----------------------------------------------------------------------------


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP echo server on 127.0.0.1 (loopback only)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async with serve(echo) as port:
        yield port


async def test_forward_round_trip(client: AgentClient, echo_port: int) -> None:
    async with await client.forward(echo_port) as fwd:
        await fwd.send(b"hello through the agent")
        assert await fwd.readexactly(23) == b"hello through the agent"
        payload = os.urandom(2 * 1024 * 1024)

        async def writer() -> None:
            await fwd.send(payload)

        task = asyncio.create_task(writer())
        got = await asyncio.wait_for(fwd.readexactly(len(payload)), 30)
        await task
        assert got == payload
        fwd.write_eof()
        assert await asyncio.wait_for(fwd.read(), 10) == b""


async def test_forward_banner_right_after_fwd_resp_is_not_lost(client: AgentClient) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-banner\r\n")
        await writer.drain()
        writer.write(await reader.read(100))
        await writer.drain()

    async with serve(banner) as port:
        for _ in range(5):
            async with await client.forward(port) as fwd:
                assert await fwd.readexactly(16) == b"SSH-2.0-banner\r\n"
                await fwd.send(b"x")
                assert await fwd.readexactly(1) == b"x"


async def test_many_concurrent_forwards(client: AgentClient, echo_port: int) -> None:
    async def one(i: int) -> bytes:
        async with await client.forward(echo_port) as fwd:
            msg = f"message {i}".encode()
            await fwd.send(msg)
            return await fwd.readexactly(len(msg))

    got = await asyncio.gather(*(one(i) for i in range(20)))
    assert got == [f"message {i}".encode() for i in range(20)]


async def test_forward_to_closed_port(client: AgentClient) -> None:
    # Bound but not listening: connecting is refused, and no one else can take the port.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        with pytest.raises(ForwardError) as info:
            await client.forward(port)
    assert str(port) in info.value.message


async def test_forward_bad_port_is_misuse(client: AgentClient) -> None:
    with pytest.raises(ValueError):  # InvalidMessage is raised before anything is sent
        await client.forward(0)


# -- activity and clock ---------------------------------------------------------------------


async def test_activity(client: AgentClient) -> None:
    first = await client.activity()
    assert first.last_activity_unix > 0
    assert first.running_sessions >= 0
    await asyncio.sleep(0.05)
    await client.exec(["true"])
    second = await client.activity()
    assert second.last_activity_unix >= first.last_activity_unix


async def test_activity_counts_sessions(client: AgentClient) -> None:
    async with client.attach(["sleep", "60"]) as tty:
        during = await client.activity()
        assert during.running_sessions >= 1
        assert during.attached_sessions >= 1
        await tty.kill()
        await tty.wait()


async def test_set_clock(client: AgentClient) -> None:
    # The test-mode agent acknowledges CLOCK_SET without touching the host's clock.
    await client.set_clock()
    await client.set_clock(1_700_000_000_000_000_000)
    with pytest.raises(ValueError):
        await client.set_clock(-1)
