"""``AsyncSandbox.commands`` and ``.pty`` of the unmodified ``e2b`` SDK, on a real
daemon with a real QEMU microVM (the async twin of test_commands.py, for what the
async SDK does its own way: callbacks on a task, stream_input, PTY on_data)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from e2b import AsyncSandbox, CommandExitException, NotFoundException, PtySize

from .conftest import E2B_MARKS, E2bDaemon, sdk_env

pytestmark = [*E2B_MARKS, pytest.mark.usefixtures("e2b_env")]


@pytest.fixture
async def sb(e2b_daemon: E2bDaemon) -> AsyncIterator[Any]:
    with sdk_env(e2b_daemon):
        sandbox = await AsyncSandbox.create(timeout=900)
    try:
        yield sandbox
    finally:
        await sandbox.kill()


async def wait_for(predicate: Any) -> None:
    """Until ``predicate()`` (output the SDK's callbacks collect), at most 30 s."""
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110 - the SDK's callbacks fill plain buffers
            await asyncio.sleep(0.05)


async def test_async_commands(sb: Any) -> None:
    """One sandbox for the whole async surface (a VM per test would cost seconds each)."""
    result = await sb.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)

    with pytest.raises(CommandExitException) as info:
        await sb.commands.run("echo bad >&2; exit 7")
    assert (info.value.exit_code, info.value.stderr) == (7, "bad\n")

    assert (await sb.commands.run("id -u", user="root")).stdout == "0\n"
    result = await sb.commands.run("pwd; echo $X", cwd="/tmp", envs={"X": "y"})
    assert result.stdout == "/tmp\ny\n"

    # Background, with callbacks (the async SDK calls them from its own task).
    seen: list[str] = []
    handle = await sb.commands.run("cat", background=True, stdin=True, on_stdout=seen.append)
    assert handle.pid in {p.pid for p in await sb.commands.list()}
    await sb.commands.send_stdin(handle.pid, "one\n")
    await wait_for(lambda: "one\n" in "".join(seen))
    # Ordered input over one client stream.
    writer = sb.commands.stream_input(handle.pid)
    for word in ("two", "three", "four"):
        await writer.send(word + "\n")
    await writer.close()
    await sb.commands.close_stdin(handle.pid)
    result = await handle.wait()
    assert result.stdout == "one\ntwo\nthree\nfour\n"
    assert "".join(seen) == result.stdout

    # Connect from a second handle, then kill.
    handle = await sb.commands.run("echo ready; sleep 300", background=True)
    other = await sb.commands.connect(handle.pid)
    assert await sb.commands.kill(handle.pid) is True
    for h in (handle, other):
        with pytest.raises(CommandExitException):
            await h.wait()
    assert await sb.commands.kill(handle.pid) is False
    with pytest.raises(NotFoundException):
        await sb.commands.send_stdin(handle.pid, "late")


async def test_async_pty(sb: Any) -> None:
    output = bytearray()
    handle = await sb.pty.create(PtySize(rows=24, cols=80), on_data=output.extend)
    await sb.pty.send_stdin(handle.pid, b"stty size; echo mark-$((6*7))\n")
    await wait_for(lambda: b"mark-42" in output)
    assert b"24 80" in output
    await sb.pty.resize(handle.pid, PtySize(rows=33, cols=99))
    await sb.pty.send_stdin(handle.pid, b"stty size\n")
    await wait_for(lambda: b"33 99" in output)
    # A second reader of the same terminal, from now on.
    later = bytearray()
    await sb.pty.connect(handle.pid, on_data=later.extend)
    await sb.pty.send_stdin(handle.pid, b"echo again-$((2*21))\n")
    await wait_for(lambda: b"again-42" in later)
    assert b"mark-42" not in later
    assert await sb.pty.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        await handle.wait()
