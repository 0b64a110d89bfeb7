"""Named namespaces: netns_exec_argv, open_connection_in, NamespaceWorker."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.network import (
    InvalidInput,
    NamespaceNotFound,
    NamespaceWorker,
    Network,
    NetworkError,
    close_dialer,
    connect_in,
    netns_exec_argv,
    open_connection_in,
)

from ._nsutil import Server, ip

pytestmark = pytest.mark.netns


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def _thread_ns() -> int:
    return _netns_inode("/proc/thread-self/ns/net")


def test_netns_exec_argv_runs_the_program_inside(netns: str) -> None:
    argv = netns_exec_argv(netns, [sys.executable, "-c", "import os; print(os.getpid())"])
    assert argv[1:4] == ["netns", "exec", netns]
    assert Path(argv[0]).name == "ip"
    probe = "import os; print(os.stat('/proc/self/ns/net').st_ino)"
    out = subprocess.run(
        netns_exec_argv(netns, [sys.executable, "-c", probe]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert int(out) == _netns_inode(f"/run/netns/{netns}")
    assert int(out) != _netns_inode("/proc/self/ns/net")


def test_netns_exec_argv_without_namespace_and_bad_input() -> None:
    assert netns_exec_argv(None, ["qemu", "-x"]) == ["qemu", "-x"]
    with pytest.raises(InvalidInput, match="needs a program"):
        netns_exec_argv(None, [])
    with pytest.raises(InvalidInput, match="network namespace name"):
        netns_exec_argv("a/b", ["true"])


async def _roundtrip(ns: str | None, host: str, port: int) -> list[str]:
    reader, writer = await open_connection_in(ns, host, port, timeout=5)
    try:
        greeting = (await reader.readline()).decode().split()
        writer.write(b"x" * 100_000)
        assert await reader.readexactly(100_000) == b"x" * 100_000
        return greeting
    finally:
        writer.close()
        await writer.wait_closed()


async def test_open_connection_in_reaches_a_server_on_the_namespaces_loopback(
    netns: str, serve_in: Callable[[str, str], Server]
) -> None:
    # 127.0.0.1 *inside* netns: only a socket created in there can reach it.
    server = serve_in(netns, "127.0.0.1")
    assert await _roundtrip(netns, "127.0.0.1", server.port) == [server.tag, "127.0.0.1"]


async def test_connect_in_returns_a_connected_nonblocking_socket(
    netns: str, serve_in: Callable[[str, str], Server]
) -> None:
    server = serve_in(netns, "127.0.0.1")
    sock = await connect_in(netns, "127.0.0.1", server.port, timeout=5)
    with sock:
        assert not sock.getblocking()
        assert sock.getpeername() == ("127.0.0.1", server.port)
        loop = asyncio.get_running_loop()
        line = b""
        while not line.endswith(b"\n"):
            line += await loop.sock_recv(sock, 100)
        assert line.decode().split() == [server.tag, "127.0.0.1"]
    with pytest.raises(ConnectionRefusedError):
        await connect_in(netns, "127.0.0.1", 9, timeout=5)


async def test_open_connection_in_many_in_parallel(
    netns_factory: Callable[[], str], serve_in: Callable[[str, str], Server]
) -> None:
    a, b = netns_factory(), netns_factory()
    sa, sb = serve_in(a, "127.0.0.1"), serve_in(b, "127.0.0.1")
    results = await asyncio.gather(
        *(_roundtrip(ns, "127.0.0.1", s.port) for _ in range(10) for ns, s in ((a, sa), (b, sb)))
    )
    assert {r[0] for r in results} == {sa.tag, sb.tag}
    assert sum(r[0] == sa.tag for r in results) == 10


async def test_open_connection_in_reaches_the_bridge_address(
    network: Network, serve_in: Callable[[str, str], Server]
) -> None:
    cfg = network.config
    assert cfg.netns is not None
    server = serve_in(cfg.netns, str(cfg.gateway))
    got = await _roundtrip(cfg.netns, str(cfg.gateway), server.port)
    assert got == [server.tag, str(cfg.gateway)]


async def test_open_connection_in_without_namespace_is_plain() -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"plain 127.0.0.1\n")
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    srv = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        assert await _roundtrip(None, "127.0.0.1", port) == ["plain", "127.0.0.1"]


async def test_open_connection_in_errors(netns: str) -> None:
    with pytest.raises(NamespaceNotFound, match="does not exist"):
        await open_connection_in("kt-missing-0000", "127.0.0.1", 1)
    with pytest.raises(InvalidInput, match="must be an IP address"):
        await open_connection_in(netns, "localhost", 1)
    with pytest.raises(InvalidInput, match="network namespace name"):
        await open_connection_in("../x", "127.0.0.1", 1)
    # Connection failures look exactly like asyncio.open_connection's.
    with pytest.raises(ConnectionRefusedError):
        await open_connection_in(netns, "127.0.0.1", 9, timeout=5)


async def test_open_connection_in_timeout(network: Network) -> None:
    cfg = network.config
    assert cfg.netns is not None
    # Nobody answers ARP for .200 on the bridge: the connect hangs until the timeout.
    with pytest.raises(TimeoutError):
        await open_connection_in(cfg.netns, "10.213.77.200", 80, timeout=0.3)


async def test_cancelled_dial_leaks_no_socket(netns: str) -> None:
    # filterwarnings=error turns a leaked socket's ResourceWarning into a failure.
    for _ in range(50):
        task = asyncio.create_task(open_connection_in(netns, "127.0.0.1", 9))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises((asyncio.CancelledError, ConnectionRefusedError)):
            await task
    close_dialer()
    gc.collect()


async def test_dialer_never_moves_the_event_loop_thread(
    netns: str, serve_in: Callable[[str, str], Server]
) -> None:
    server = serve_in(netns, "127.0.0.1")
    before = _netns_inode("/proc/thread-self/ns/net")
    await _roundtrip(netns, "127.0.0.1", server.port)
    assert _netns_inode("/proc/thread-self/ns/net") == before
    with socket.socket() as s:  # a fresh socket still lives in our own namespace
        s.bind(("127.0.0.1", 0))


def test_worker_runs_inside_and_leaves_a_deleted_namespace(netns: str) -> None:
    left: list[int] = []
    worker = NamespaceWorker(netns, on_leave=lambda: left.append(_thread_ns()))
    try:
        inside = worker.run(_thread_ns)
        assert inside == _netns_inode(f"/run/netns/{netns}")
        assert _thread_ns() != inside  # the caller's thread never moved
        home = _netns_inode("/proc/self/ns/net")

        ip("netns", "del", netns)
        with pytest.raises(NamespaceNotFound):
            worker.run(lambda: None)
        assert left == [inside]  # told to drop its sockets, then went home
        assert worker.submit(lambda: None).exception() is not None
        ip("netns", "add", netns)
        again = worker.run(_thread_ns)
        assert again == _netns_inode(f"/run/netns/{netns}") != inside
        assert again != home
        generation = worker.generation

        # Re-created while inside: the worker notices without a failed call.
        ip("netns", "del", netns)
        ip("netns", "add", netns)
        assert worker.run(_thread_ns) == _netns_inode(f"/run/netns/{netns}") != again
        assert left == [inside, again]
        assert worker.generation == generation + 1
    finally:
        worker.close()
    with pytest.raises(NetworkError, match="closed"):
        worker.run(lambda: None)


def test_worker_without_namespace_stays_home() -> None:
    worker = NamespaceWorker(None)
    try:
        assert worker.run(lambda: _netns_inode("/proc/thread-self/ns/net")) == _netns_inode(
            "/proc/self/ns/net"
        )
    finally:
        worker.close()
