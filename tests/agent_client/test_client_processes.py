"""Background processes through the client against a real test-mode agent."""

from __future__ import annotations

import asyncio
import os
import pwd
import time

import pytest

from kiln.agent_client import (
    AgentClient,
    CannotStart,
    Exit,
    NoTerminal,
    ProcessFinished,
    ProcessNotFound,
    ProcessOutput,
    Stderr,
    Stdout,
)
from kiln.guest.processes import FINISHED_WITH_OUTPUT
from kiln.protocol import OUTPUT_KEPT

from .helpers import wait_dead


async def collect(reader: ProcessOutput, within: float = 10) -> tuple[bytes, bytes, int | None]:
    out, err = bytearray(), bytearray()
    code = None
    async with asyncio.timeout(within):
        async for event in reader:
            if isinstance(event, Stdout):
                out += event.data
            elif isinstance(event, Stderr):
                err += event.data
            else:
                code = event.code
    return bytes(out), bytes(err), code


async def read_all(
    client: AgentClient, pid: int, *, replay: bool = True
) -> tuple[bytes, bytes, int | None]:
    async with client.process_output(pid, replay=replay) as reader:
        return await collect(reader)


async def test_start_runs_detached_and_reports_exit(client: AgentClient) -> None:
    info = await client.start_process(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert info.pid > 0 and info.cmd == ("sh", "-c", "echo out; echo err >&2; exit 3")
    assert info.started_at == pytest.approx(time.time(), abs=5)
    out, err, code = await read_all(client, info.pid)
    assert (out, err, code) == (b"out\n", b"err\n", 3)
    done = await client.get_process(info.pid)
    assert (done.running, done.exit_code) == (False, 3)
    assert done.finished_at is not None and done.finished_at >= done.started_at


async def test_output_outlives_the_connection_and_replays_in_order(client: AgentClient) -> None:
    script = "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.05; done"
    info = await client.start_process(["sh", "-c", script])
    first = await read_all(client, info.pid)
    again = await read_all(client, info.pid)
    assert first == again == (b"o1\no2\no3\n", b"e1\ne2\ne3\n", 0)
    # Interleaving is kept: events alternate as they were written.
    async with client.process_output(info.pid) as reader:
        kinds = [type(e).__name__ for e in [e async for e in reader]]
    assert kinds == ["Stdout", "Stderr"] * 3 + ["Exit"]


async def test_two_readers_live_and_a_reader_leaving_does_not_stop_it(client: AgentClient) -> None:
    info = await client.start_process(["sh", "-c", "read x; echo got $x; sleep 0.2; echo bye"])
    # One reader leaves early.
    async with client.process_output(info.pid) as reader:
        assert reader.info is not None and reader.info.running
    readers = [asyncio.create_task(read_all(client, info.pid)) for _ in range(2)]
    await asyncio.sleep(0.1)
    await client.process_input(info.pid, b"hello\n")
    results = await asyncio.gather(*readers)
    assert results == [(b"got hello\nbye\n", b"", 0)] * 2


async def test_live_only_reader_skips_what_was_kept(client: AgentClient) -> None:
    info = await client.start_process(["sh", "-c", "echo early; read x; echo late"])
    await wait_output(client, info.pid, b"early\n")
    task = asyncio.create_task(read_all(client, info.pid, replay=False))
    await asyncio.sleep(0.1)
    await client.process_input(info.pid, b"\n", close=True)
    assert await task == (b"late\n", b"", 0)


async def wait_output(client: AgentClient, pid: int, expected: bytes) -> None:
    async with asyncio.timeout(5):
        while True:
            async with client.process_output(pid) as reader:
                seen = bytearray()
                async for event in reader:
                    if isinstance(event, Stdout):
                        seen += event.data
                    if seen.startswith(expected):
                        return
                    if isinstance(event, Exit):
                        break
            await asyncio.sleep(0.02)


async def test_stdin_close_ends_cat(client: AgentClient) -> None:
    info = await client.start_process(["cat"])
    await client.process_input(info.pid, b"one\n")
    await client.process_input(info.pid, b"two\n", close=True)
    assert await read_all(client, info.pid) == (b"one\ntwo\n", b"", 0)
    with pytest.raises(ProcessFinished):
        await client.process_input(info.pid, b"late")


async def test_signals_reach_the_process_group(client: AgentClient) -> None:
    info = await client.start_process(["sh", "-c", "sleep 30 & echo $!; wait"])
    out, _err, _code = b"", b"", None
    async with client.process_output(info.pid) as reader:
        async for event in reader:
            if isinstance(event, Stdout):
                out = event.data
                break
    grandchild = int(out)
    await client.signal_process(info.pid, "TERM")
    assert (await read_all(client, info.pid))[2] == 128 + 15
    await wait_dead(grandchild)  # the whole group got it
    with pytest.raises(ProcessFinished):
        await client.signal_process(info.pid, "KILL")


async def test_kill_by_name_forms(client: AgentClient) -> None:
    info = await client.start_process(["sleep", "30"])
    await client.signal_process(info.pid, "sigkill")
    assert (await read_all(client, info.pid))[2] == 128 + 9


async def test_bad_requests(client: AgentClient) -> None:
    with pytest.raises(ProcessNotFound):
        await client.get_process(999_999_999)
    with pytest.raises(ProcessNotFound):
        await client.signal_process(999_999_999, "TERM")
    with pytest.raises(ProcessNotFound):
        await client.process_input(999_999_999, b"x")
    with pytest.raises(ValueError, match="unknown signal 'BOGUS'"):
        await client.signal_process(1, "BOGUS")
    with pytest.raises(CannotStart) as info:
        await client.start_process(["kiln-no-such-command"])
    assert info.value.exit_code == 127
    assert "command not found" in info.value.message


async def test_list_has_processes_and_sessions(client: AgentClient) -> None:
    proc = await client.start_process(["sleep", "30"])
    async with client.attach(["sleep", "30"]) as tty:
        session_id = tty.session_id
    listing = {p.pid: p for p in await client.list_processes()}
    assert listing[proc.pid].tty is False and listing[proc.pid].running
    sessions = [p for p in listing.values() if p.tty]
    assert [s.session_id for s in sessions] == [session_id]
    session_pid = sessions[0].pid
    # A session is an entry like any other: signal it by pid, read its output.
    await client.signal_process(session_pid, "KILL")
    await client.signal_process(proc.pid, "KILL")
    assert (await read_all(client, session_pid))[2] == 128 + 9


async def test_background_child_holding_the_pipe_does_not_hold_readers(
    client: AgentClient,
) -> None:
    """The process exits, its own background child keeps stdout: readers get EXIT,
    the child keeps running and its later output is still kept."""
    info = await client.start_process(["sh", "-c", "(sleep 0.5; echo later) & echo now"])
    started = time.monotonic()
    assert await read_all(client, info.pid) == (b"now\n", b"", 0)
    assert time.monotonic() - started < 0.45
    await asyncio.sleep(0.8)
    assert (await read_all(client, info.pid))[0] == b"now\nlater\n"


async def test_keeps_the_last_mebibyte_of_each_stream(client: AgentClient) -> None:
    total = OUTPUT_KEPT + 300_000
    script = f"head -c {total} /dev/zero | tr '\\0' o; head -c 1000 /dev/zero | tr '\\0' e >&2"
    info = await client.start_process(["sh", "-c", script])
    assert (await read_all(client, info.pid, replay=False))[2] == 0  # until it exits
    out, err, code = await read_all(client, info.pid)  # a reader that comes later
    assert (len(out), err, code) == (OUTPUT_KEPT, b"e" * 1000, 0)
    assert set(out) == {ord("o")}


async def test_finished_entries_are_kept_then_evicted_oldest_first(client: AgentClient) -> None:
    first = await client.start_process(["true"])
    await read_all(client, first.pid)
    for _ in range(64):
        info = await client.start_process(["true"])
        await read_all(client, info.pid)
    with pytest.raises(ProcessNotFound):
        await client.get_process(first.pid)
    assert (await client.get_process(info.pid)).exit_code == 0


async def test_user_is_reported(client: AgentClient) -> None:
    info = await client.start_process(["true"])
    assert info.user == pwd.getpwuid(os.geteuid()).pw_name


async def test_without_follow_a_reader_gets_what_is_kept_then_ends(client: AgentClient) -> None:
    info = await client.start_process(["sh", "-c", "echo kept; echo err >&2; sleep 30"])
    async with asyncio.timeout(5):
        while True:  # until both pipes have been read
            async with client.process_output(info.pid, follow=False) as reader:
                out, err, code = await collect(reader, within=2)
            if err:
                break
            await asyncio.sleep(0.02)
    assert (out, err, code) == (b"kept\n", b"err\n", None)
    await client.signal_process(info.pid, "KILL")
    async with asyncio.timeout(5):  # the signal is sent; the agent reaps a moment later
        while (await client.get_process(info.pid)).running:  # noqa: ASYNC110 -- polled state
            await asyncio.sleep(0.02)
    async with client.process_output(info.pid, follow=False) as reader:
        assert (await collect(reader))[2] == 128 + 9  # finished: the exit code too


async def test_a_slow_reader_still_gets_the_end_and_the_exit(client: AgentClient) -> None:
    """The agent waits on the host (a slow reader) while the process ends: the
    wakeup for the end must not be lost meanwhile."""
    script = "sleep 0.3; head -c 3000000 /dev/zero; sleep 0.3; echo END"
    info = await client.start_process(["sh", "-c", script])
    async with client.process_output(info.pid, replay=False) as reader:
        await asyncio.sleep(2)  # not reading: the agent's writes back up
        out, _err, code = await collect(reader, within=5)
    assert out.endswith(b"END\n") and code == 0


async def test_input_for_a_process_that_exits_without_reading_it_is_answered(
    client: AgentClient,
) -> None:
    # The background sleep keeps stdin open, so writes block instead of failing.
    info = await client.start_process(["sh", "-c", "exec 3<&0; sleep 30 & sleep 0.5"])
    async with asyncio.timeout(5):
        with pytest.raises(ProcessFinished, match="exited before reading"):
            for _ in range(20):
                await client.process_input(info.pid, b"x" * (1 << 20))
    # Its leftover still holds the pipes: it can still be signalled, then it is over.
    await client.signal_process(info.pid, "KILL")
    await asyncio.sleep(0.3)
    with pytest.raises(ProcessFinished):
        await client.signal_process(info.pid, "KILL")


async def test_looking_up_a_process_is_not_activity(client: AgentClient) -> None:
    info = await client.start_process(["sleep", "30"])
    before = (await client.activity()).last_activity_unix
    await asyncio.sleep(0.05)
    assert (await client.get_process(info.pid)).running
    assert (await client.activity()).last_activity_unix == before
    await client.signal_process(info.pid, "KILL")


async def test_only_the_most_recent_finished_processes_keep_their_output(
    client: AgentClient,
) -> None:
    first = await client.start_process(["echo", "first"])
    assert await read_all(client, first.pid) == (b"first\n", b"", 0)
    for _ in range(FINISHED_WITH_OUTPUT):
        info = await client.start_process(["echo", "later"])
        await read_all(client, info.pid)
    assert await read_all(client, first.pid) == (b"", b"", 0)  # listed, output freed
    assert await read_all(client, info.pid) == (b"later\n", b"", 0)


# ---- stdin, tag, terminals (what E2B's process service needs) ----------------------


async def test_stdin_false_is_end_of_file_from_the_start(client: AgentClient) -> None:
    info = await client.start_process(["sh", "-c", "cat; echo done"], stdin=False)
    assert await read_all(client, info.pid) == (b"done\n", b"", 0)
    # With stdin (the default) the same command waits for its input.
    info = await client.start_process(["sh", "-c", "cat; echo done"])
    await client.process_input(info.pid, b"in\n", close=True)
    assert await read_all(client, info.pid) == (b"in\ndone\n", b"", 0)


async def test_tag_env_and_cwd_are_listed(client: AgentClient, tmp_path: object) -> None:
    info = await client.start_process(
        ["sh", "-c", "pwd; echo $GREETING; sleep 30"],
        env={"GREETING": "hi"},
        cwd="/tmp",
        tag="web",
    )
    try:
        assert (info.tag, info.cwd, dict(info.env)) == ("web", "/tmp", {"GREETING": "hi"})
        listed = {p.pid: p for p in await client.list_processes()}[info.pid]
        assert (listed.tag, listed.cwd, dict(listed.env)) == ("web", "/tmp", {"GREETING": "hi"})
        async with client.process_output(info.pid) as reader:
            async for event in reader:
                assert isinstance(event, Stdout)
                assert event.data.startswith(b"/tmp\n")
                break
    finally:
        await client.signal_process(info.pid, "KILL")


async def test_tty_process_by_pid(client: AgentClient) -> None:
    info = await client.start_process(
        ["sh", "-c", "stty size; read line; stty size; echo got-$line"],
        tty=True,
        rows=30,
        cols=100,
        tag="term",
    )
    assert info.tty and info.session_id is not None and info.tag == "term"
    async with client.process_output(info.pid) as reader:
        seen = bytearray()
        async with asyncio.timeout(10):
            async for event in reader:
                assert isinstance(event, Stdout | Exit)  # a terminal has one stream
                if isinstance(event, Stdout):
                    seen += event.data
                if b"30 100" in seen:
                    break
    await client.resize_process(info.pid, 40, 120)
    await client.process_input(info.pid, b"x\n")
    out, err, code = await read_all(client, info.pid)
    assert b"40 120" in out and b"got-x" in out
    assert (err, code) == (b"", 0)


async def test_resize_refusals(client: AgentClient) -> None:
    piped = await client.start_process(["sleep", "30"])
    try:
        with pytest.raises(NoTerminal):
            await client.resize_process(piped.pid, 24, 80)
    finally:
        await client.signal_process(piped.pid, "KILL")
    with pytest.raises(ProcessNotFound):
        await client.resize_process(999_999, 24, 80)
    done = await client.start_process(["true"], tty=True)
    await read_all(client, done.pid)
    with pytest.raises(ProcessFinished):
        await client.resize_process(done.pid, 24, 80)
    with pytest.raises(ValueError):
        await client.resize_process(done.pid, 0, 80)


async def test_tty_start_failure(client: AgentClient) -> None:
    with pytest.raises(CannotStart) as info:
        await client.start_process(["/no/such/program"], tty=True)
    assert info.value.exit_code == 127


async def test_cwd_in_the_users_home(client: AgentClient) -> None:
    home = pwd.getpwuid(os.geteuid()).pw_dir  # a test-mode agent runs as its starter
    info = await client.start_process(["pwd"], cwd="~")
    assert await read_all(client, info.pid) == (f"{home}\n".encode(), b"", 0)
    result = await client.exec(["pwd"], cwd="~/")
    assert result.stdout == f"{home}\n".encode()
