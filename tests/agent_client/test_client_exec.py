"""Piped exec through the client against a real test-mode agent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kiln.agent_client import (
    AgentClient,
    AgentTimeout,
    ExecEvent,
    ExecResult,
    Exit,
    Stderr,
    Stdout,
)

from .helpers import kill_quietly, pid_alive, same_path, wait_dead, wait_for_file


@pytest.fixture
def client(shared_client: AgentClient) -> AgentClient:
    """One agent for the whole module: these tests do not depend on its state."""
    return shared_client


async def test_exec_true(client: AgentClient) -> None:
    result = await client.exec(["true"])
    assert result == ExecResult(0, b"", b"")
    assert result.ok


async def test_exec_echo(client: AgentClient) -> None:
    result = await client.exec(["echo", "hello", "wörld"])
    assert result.exit_code == 0
    assert result.stdout == "hello wörld\n".encode()
    assert result.stderr == b""


@pytest.mark.parametrize("code", [1, 2, 42, 255])
async def test_exit_codes(client: AgentClient, code: int) -> None:
    result = await client.exec(["sh", "-c", f"exit {code}"])
    assert result.exit_code == code
    assert not result.ok


async def test_killed_by_signal_is_128_plus_n(client: AgentClient) -> None:
    result = await client.exec(["sh", "-c", "kill -9 $$"])
    assert result.exit_code == 128 + 9


async def test_command_not_found(client: AgentClient) -> None:
    result = await client.exec(["/definitely/not/a/command"])
    assert result.exit_code == 127
    assert result.stderr  # a message, not a dropped connection


async def test_not_executable(client: AgentClient, workdir: Path) -> None:
    script = workdir / "noexec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = await client.exec([str(script)])
    assert result.exit_code == 126
    assert result.stderr


async def test_stderr_is_separate(client: AgentClient) -> None:
    result = await client.exec(["sh", "-c", "echo out; echo err >&2; echo out2"])
    assert result.stdout == b"out\nout2\n"
    assert result.stderr == b"err\n"


async def test_env_and_cwd(client: AgentClient, workdir: Path) -> None:
    result = await client.exec(
        ["sh", "-c", 'echo "$KILN_A|$KILN_B"; pwd'],
        env={"KILN_A": "1", "KILN_B": "ünïcode value"},
        cwd=str(workdir),
    )
    assert result.exit_code == 0
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "1|ünïcode value"
    assert same_path(lines[1], workdir)


async def test_default_environment_has_path(client: AgentClient) -> None:
    result = await client.exec(["sh", "-c", 'test -n "$PATH" && echo "$PATH"'])
    assert result.exit_code == 0
    assert b"/bin" in result.stdout


async def test_stdin_bytes(client: AgentClient) -> None:
    data = bytes(range(256)) * 10
    result = await client.exec(["cat"], stdin=data)
    assert result.stdout == data


async def test_command_that_ignores_its_stdin(client: AgentClient) -> None:
    # The command ends, and the agent closes, before reading the input: no error.
    for _ in range(20):
        result = await client.exec(["true"], stdin=os.urandom(2 * 1024 * 1024))
        assert result == ExecResult(0, b"", b"")


async def test_input_after_the_command_ended_is_dropped(client: AgentClient) -> None:
    async with client.exec_stream(["true"]) as proc:
        assert [e async for e in proc] == [Exit(0)]
        await proc.send_stdin(b"too late" * 100_000)
        await proc.close_stdin()
        await proc.kill()


async def test_stdin_is_closed_when_not_given(client: AgentClient) -> None:
    # cat would wait forever on an open stdin.
    result = await client.exec(["cat"], timeout=10)
    assert result == ExecResult(0, b"", b"")


async def test_large_stdin_echoed_does_not_deadlock(client: AgentClient) -> None:
    # Far more than the socket and pipe buffers hold: input and output must overlap.
    data = os.urandom(24 * 1024 * 1024)
    result = await client.exec(["cat"], stdin=data, timeout=30)
    assert result.exit_code == 0
    assert result.stdout == data


async def test_one_megabyte_of_output(client: AgentClient) -> None:
    result = await client.exec(["head", "-c", "1048576", "/dev/zero"])
    assert result.exit_code == 0
    assert result.stdout == b"\0" * 1048576


async def test_large_output_on_both_streams(client: AgentClient) -> None:
    script = "head -c 2000000 /dev/zero; head -c 1500000 /dev/zero | tr '\\0' 'e' >&2"
    result = await client.exec(["sh", "-c", script])
    assert len(result.stdout) == 2_000_000
    assert result.stderr == b"e" * 1_500_000


async def test_streaming_event_order(client: AgentClient) -> None:
    script = "echo one; sleep 0.05; echo two >&2; sleep 0.05; echo three; exit 3"
    events: list[ExecEvent] = []
    async with client.exec_stream(["sh", "-c", script]) as proc:
        async for event in proc:
            events.append(event)
        assert proc.exit_code == 3
    assert events[-1] == Exit(3)
    assert all(not isinstance(e, Exit) for e in events[:-1])
    out = b"".join(e.data for e in events if isinstance(e, Stdout))
    err = b"".join(e.data for e in events if isinstance(e, Stderr))
    assert out == b"one\nthree\n"
    assert err == b"two\n"
    # Output is streamed as it happens, not buffered to the end.
    assert len(events) >= 4


async def test_streaming_first_output_arrives_before_exit(client: AgentClient) -> None:
    async with client.exec_stream(["sh", "-c", "echo ready; sleep 30"]) as proc:
        first = await asyncio.wait_for(anext(proc), 10)
        assert first == Stdout(b"ready\n")
        await proc.kill()
        rest = [e async for e in proc]
    assert rest[-1] == Exit(128 + 9)


async def test_interactive_stdin(client: AgentClient) -> None:
    async with client.exec_stream(["cat"]) as proc:
        await proc.send_stdin(b"ping\n")
        assert await asyncio.wait_for(anext(proc), 10) == Stdout(b"ping\n")
        await proc.send_stdin(b"pong\n")
        assert await asyncio.wait_for(anext(proc), 10) == Stdout(b"pong\n")
        await proc.close_stdin()
        assert [e async for e in proc] == [Exit(0)]


async def test_exec_stream_wait(client: AgentClient) -> None:
    async with client.exec_stream(["sh", "-c", "echo a; echo b >&2"], stdin=b"") as proc:
        result = await proc.wait()
    assert result == ExecResult(0, b"a\n", b"b\n")


async def test_kill_kills_the_process_group(client: AgentClient, workdir: Path) -> None:
    pidfile = workdir / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    async with client.exec_stream(["sh", "-c", script]) as proc:
        pid = int(await wait_for_file(pidfile))
        try:
            assert pid_alive(pid)
            await proc.kill()
            events = [e async for e in proc]
            assert isinstance(events[-1], Exit)
            assert events[-1].code == 128 + 9
            await wait_dead(pid)
        finally:
            kill_quietly(pid)


async def test_cancelling_the_consumer_kills_the_command(
    client: AgentClient, workdir: Path
) -> None:
    pidfile = workdir / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; echo started; wait"

    async def consume() -> None:
        async with client.exec_stream(["sh", "-c", script]) as proc:
            async for _ in proc:
                pass

    task = asyncio.create_task(consume())
    pid = int(await wait_for_file(pidfile))
    try:
        assert pid_alive(pid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # cancellation is never swallowed or wrapped
        assert task.cancelled()
        await wait_dead(pid)
    finally:
        kill_quietly(pid)


async def test_leaving_the_block_early_kills_the_command(
    client: AgentClient, workdir: Path
) -> None:
    pidfile = workdir / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; echo started; wait"
    async with client.exec_stream(["sh", "-c", script]) as proc:
        async for event in proc:
            assert event == Stdout(b"started\n")
            break
    pid = int(await wait_for_file(pidfile))
    try:
        await wait_dead(pid)
    finally:
        kill_quietly(pid)


async def test_timeout_kills_and_raises(client: AgentClient, workdir: Path) -> None:
    pidfile = workdir / "child.pid"
    script = f"echo $$ > {pidfile}; exec sleep 60"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(AgentTimeout):
        await client.exec(["sh", "-c", script], timeout=0.5)
    assert loop.time() - started < 5
    pid = int(await wait_for_file(pidfile))
    try:
        await wait_dead(pid)
    finally:
        kill_quietly(pid)


async def test_outer_timeout_is_a_cancellation_not_wrapped(client: AgentClient) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await client.exec(["sleep", "30"])


async def test_many_concurrent_execs(client: AgentClient) -> None:
    async def one(i: int) -> ExecResult:
        return await client.exec(["sh", "-c", f"echo {i}; echo e{i} >&2; exit {i % 7}"])

    results = await asyncio.gather(*(one(i) for i in range(40)))
    for i, result in enumerate(results):
        assert result == ExecResult(i % 7, f"{i}\n".encode(), f"e{i}\n".encode())


async def test_cmd_must_be_a_list(client: AgentClient) -> None:
    with pytest.raises(TypeError):
        await client.exec("echo hi")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.exec([])


async def test_exec_stream_outside_context_is_misuse(client: AgentClient) -> None:
    proc = client.exec_stream(["true"])
    with pytest.raises(RuntimeError):
        await proc.kill()
    with pytest.raises(RuntimeError):
        await anext(proc)
