"""A minimal host side for the agent tests: frames over Unix sockets, kiln.protocol only.

Deliberately not the host client (kiln.agent_client): these tests pin the
agent's wire behaviour on their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.protocol import Frame, FrameStream, FrameType, decode_exit, encode_frame

DEFAULT_TIMEOUT = 10.0


class Conn:
    """One connection to the agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.stream = FrameStream(reader, writer)

    @classmethod
    async def open(cls, path: Path, token: str | None = None) -> Conn:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 21)
        conn = cls(reader, writer)
        if token is not None:
            await conn.send(FrameType.AUTH, token.encode())
        return conn

    @classmethod
    async def open_tcp(cls, host: str, port: int, token: str | None = None) -> Conn:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 21)
        conn = cls(reader, writer)
        if token is not None:
            await conn.send(FrameType.AUTH, token.encode())
        return conn

    async def __aenter__(self) -> Conn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, ftype: int, payload: bytes = b"") -> None:
        await self.stream.send(ftype, payload)

    async def send_json(self, ftype: int, obj: Any) -> None:
        await self.send(ftype, json.dumps(obj).encode())

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, within: float = DEFAULT_TIMEOUT) -> Frame | None:
        """The next frame; None at EOF (or a reset after the agent closed)."""
        try:
            async with asyncio.timeout(within):
                return await self.stream.recv()
        except ConnectionResetError:
            return None

    async def expect(self, ftype: int, within: float = DEFAULT_TIMEOUT) -> Frame:
        frame = await self.recv(within)
        assert frame is not None, f"connection closed, expected {FrameType(ftype).name}"
        if frame.type != ftype:
            detail = frame.payload[:300] if frame.type == FrameType.ERROR else ""
            raise AssertionError(f"expected {FrameType(ftype).name}, got {frame!r} {detail!r}")
        return frame

    async def expect_json(self, ftype: int, within: float = DEFAULT_TIMEOUT) -> Any:
        return json.loads((await self.expect(ftype, within)).payload)

    async def expect_error(self, within: float = DEFAULT_TIMEOUT) -> str:
        return (await self.expect(FrameType.ERROR, within)).payload.decode()

    async def expect_closed(self, within: float = DEFAULT_TIMEOUT) -> None:
        frame = await self.recv(within)
        assert frame is None, f"expected the agent to close, got {frame!r}"

    async def close(self) -> None:
        await self.stream.close()


@dataclass
class Result:
    stdout: bytes = b""
    stderr: bytes = b""
    code: int | None = None
    error: str | None = None
    frames: list[Frame] = field(default_factory=list)


async def collect(conn: Conn, within: float = DEFAULT_TIMEOUT) -> Result:
    """Read until EXIT, ERROR or EOF."""
    result = Result()
    async with asyncio.timeout(within):
        while True:
            frame = await conn.recv(within)
            if frame is None:
                return result
            result.frames.append(frame)
            if frame.type == FrameType.STDOUT:
                result.stdout += frame.payload
            elif frame.type == FrameType.STDERR:
                result.stderr += frame.payload
            elif frame.type == FrameType.EXIT:
                result.code = decode_exit(frame.payload)
                return result
            elif frame.type == FrameType.ERROR:
                result.error = frame.payload.decode()
                return result


def exec_req(cmd: list[str], **fields: Any) -> bytes:
    return json.dumps({"cmd": cmd, **fields}).encode()


async def run(
    agent: Any,
    cmd: list[str],
    *,
    stdin: bytes | None = None,
    within: float = DEFAULT_TIMEOUT,
    **fields: Any,
) -> Result:
    """A piped exec: send the request (and stdin, then EOF if given), collect the result."""
    async with await Conn.open(agent.control, agent.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(cmd, **fields))
        if stdin is not None:
            if stdin:
                await conn.send(FrameType.STDIN, stdin)
            await conn.send(FrameType.STDIN, b"")
        return await collect(conn, within)


async def request(agent: Any, ftype: int, payload: Any = None) -> Frame:
    """One single-answer request (list, stat, ls, activity, clock, kill); the answer frame."""
    async with await Conn.open(agent.control, agent.token) as conn:
        data = b"" if payload is None else json.dumps(payload).encode()
        await conn.send(ftype, data)
        frame = await conn.recv()
        assert frame is not None, "agent closed without an answer"
        return frame


async def wait_for(
    predicate: Callable[[], bool], within: float = 5.0, interval: float = 0.01
) -> None:
    """Bounded polling for a condition that has no event to wait on."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but unreaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = data[data.rindex(b")") + 2 :].split()[0]
    return state not in (b"Z", b"X")


@dataclass(frozen=True)
class ProcEntry:
    pid: int
    comm: str
    state: str
    ppid: int


def processes() -> list[ProcEntry]:
    """Every process, from /proc/PID/stat (those that vanish meanwhile are skipped)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split at the last ')'.
        comm = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
        fields = data[data.rindex(b")") + 2 :].split()
        out.append(ProcEntry(int(name), comm, fields[0].decode(), int(fields[1])))
    return out


def zombie_children(pid: int) -> list[int]:
    return [p.pid for p in processes() if p.state == "Z" and p.ppid == pid]


def raw_frame(ftype: int, payload: bytes = b"") -> bytes:
    return encode_frame(ftype, payload)
