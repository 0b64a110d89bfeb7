"""``sandbox.processes`` and the Process handle, sync and async, against a real daemon."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from kiln.sdk import (
    AsyncKiln,
    Conflict,
    Exit,
    NotFound,
    Process,
    Sandbox,
    Stderr,
    Stdout,
    Timeout,
    ValidationError,
)

from .conftest import unique


def test_start_list_get_and_wait(sb: Sandbox) -> None:
    proc = sb.processes.start("echo out; echo err >&2; sleep 0.2; exit 3")
    assert isinstance(proc, Process)
    assert proc.cmd == ("sh", "-c", "echo out; echo err >&2; sleep 0.2; exit 3")
    assert proc.running and proc.exit_code is None and proc.finished_at is None
    assert isinstance(proc.started_at, datetime)
    assert proc.pid in [p.pid for p in sb.processes.list()]
    assert sb.processes.get(proc.pid).cmd == proc.cmd

    assert proc.wait(timeout=10) == 3
    assert (proc.running, proc.exit_code) == (False, 3)
    assert proc.finished_at is not None and proc.started_at is not None
    assert proc.finished_at >= proc.started_at
    assert proc.to_dict()["exit_code"] == 3


def test_iterating_a_handle_reads_kept_then_live_output(sb: Sandbox) -> None:
    proc = sb.processes.start(["sh", "-c", "printf 'a\\377'; printf e >&2; sleep 0.3; echo b"])
    events = list(proc)
    out = b"".join(e.data for e in events if isinstance(e, Stdout))
    assert out == b"a\xffb\n"  # raw bytes, as exec_stream gives them
    assert Stderr(b"e") in events
    assert events[-1] == Exit(0)
    assert proc.exit_code == 0 and not proc.running
    # Read again: the kept output is replayed to every new reader.
    again = list(sb.processes.output(proc.pid))
    assert b"".join(e.data for e in again if isinstance(e, Stdout)) == out


def test_leaving_a_reader_early_keeps_the_process(sb: Sandbox) -> None:
    proc = sb.processes.start("while :; do echo x; sleep 0.05; done")
    with proc.output() as events:
        assert next(events) == Stdout(b"x\n")
    assert proc.refresh().running
    kept = list(sb.processes.output(proc.pid, follow=False))
    assert kept and all(isinstance(e, Stdout) for e in kept)  # no Exit: it still runs
    proc.kill()
    assert proc.wait(timeout=10) == 137


def test_stdin_and_signals(sb: Sandbox) -> None:
    cat = sb.processes.start(["cat"])
    cat.stdin("hello ")
    sb.processes.stdin(cat.pid, b"world\n", close=True)
    assert cat.wait(timeout=10) == 0
    assert b"".join(e.data for e in cat.output() if isinstance(e, Stdout)) == b"hello world\n"
    with pytest.raises(Conflict):
        cat.stdin("late")
    with pytest.raises(Conflict):
        cat.signal("TERM")

    sleeper = sb.processes.start(["sleep", "30"])
    sleeper.signal("SIGTERM")
    assert sleeper.wait(timeout=10) == 143


def test_wait_timeout(sb: Sandbox) -> None:
    proc = sb.processes.start(["sleep", "30"])
    began = time.monotonic()
    with pytest.raises(Timeout):
        proc.wait(timeout=0.3)
    assert time.monotonic() - began < 5
    assert proc.refresh().running  # waiting gave up; the process did not
    proc.kill()


def test_errors(sb: Sandbox) -> None:
    with pytest.raises(NotFound):
        sb.processes.get(4_000_000)
    with pytest.raises(NotFound):
        list(sb.processes.output(4_000_000))
    with pytest.raises(ValidationError, match="not found"):
        sb.processes.start(["no-such-command-here"])
    proc = sb.processes.start(["sleep", "30"])
    with pytest.raises(ValidationError, match="STOP"):
        proc.signal("STOP")
    with pytest.raises(ValueError, match="pid"):
        sb.processes.get(0)
    proc.kill()


async def test_async_processes(akiln: AsyncKiln) -> None:
    sb = await akiln.sandboxes.create(name=unique("aproc"))
    try:
        proc = await sb.processes.start("echo hi; read line; echo got $line")
        assert proc.running
        assert [p.pid for p in await sb.processes.list()] == [proc.pid]
        await proc.stdin("it\n", close=True)
        events = [e async for e in proc]
        assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"hi\ngot it\n"
        assert events[-1] == Exit(0) and proc.exit_code == 0
        assert (await sb.processes.get(proc.pid)).finished_at is not None

        sleeper = await sb.processes.start(["sleep", "30"])
        with pytest.raises(Timeout):
            await sleeper.wait(timeout=0.2)
        await sleeper.kill()
        assert await sleeper.wait(timeout=10) == 137
        with pytest.raises(Conflict):
            await sleeper.kill()
        with pytest.raises(NotFound):
            await sb.processes.get(4_000_000)
    finally:
        await sb.delete()


def test_tag_tty_and_resize(sb: Sandbox) -> None:
    proc = sb.processes.start("stty size; read x; stty size", tty=True, rows=10, cols=40, tag="t")
    assert proc.tty and proc.tag == "t"
    with proc.output() as events:
        seen = bytearray()
        for event in events:
            seen += event.data if isinstance(event, Stdout) else b""
            if b"10 40" in seen:
                break
    proc.resize(12, 44)
    proc.stdin("\n")
    out = b"".join(e.data for e in proc if isinstance(e, Stdout))
    assert b"10 40" in out and b"12 44" in out
    assert proc.exit_code == 0
    piped = sb.processes.start(["cat"], stdin=False, cwd="/tmp")
    assert piped.wait(timeout=10) == 0 and piped.info.cwd == "/tmp"
    with pytest.raises(Conflict):
        piped.resize(10, 10)
