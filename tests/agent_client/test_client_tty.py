"""TTY sessions through the client: relay, resize, detach/reattach, list, kill."""

from __future__ import annotations

import asyncio
import re

import pytest

from kiln.agent_client import AgentClient, RemoteError, TtySession
from kiln.protocol import SessionInfo

from .helpers import kill_quietly, wait_dead


async def read_until(tty: TtySession, pattern: bytes, within: float = 10.0) -> bytes:
    """Output up to and including the first match of regex ``pattern``."""
    seen = b""
    async with asyncio.timeout(within):
        async for chunk in tty:
            seen += chunk
            if re.search(pattern, seen):
                return seen
    raise AssertionError(f"session ended before {pattern!r}; got {seen!r}")


async def find_session(client: AgentClient, marker: str) -> SessionInfo:
    for info in await client.list_sessions():
        if marker in info.argv:
            return info
    raise AssertionError(f"no session running {marker!r}")


async def test_new_session_relays_bytes(client: AgentClient) -> None:
    async with client.attach(["sh"], rows=24, cols=80) as tty:
        # The agent announces the new session's id before any output.
        assert tty.info is not None
        assert tty.info.running
        assert tty.info.tty
        assert tty.session_id == tty.info.session_id
        assert tty.session_id in {s.session_id for s in await client.list_sessions()}
        await tty.write(b"echo $((6 * 7))-answer\n")
        out = await read_until(tty, rb"42-answer")
        assert b"42-answer" in out
        await tty.write(b"exit 0\n")
        assert await asyncio.wait_for(tty.wait(), 10) == 0
    assert tty.exit_code == 0


async def test_session_is_a_real_terminal(client: AgentClient) -> None:
    async with client.attach(["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty"]) as tty:
        out = await read_until(tty, rb"is-a-tty")
        assert b"is-a-tty" in out
        assert await asyncio.wait_for(tty.wait(), 10) == 0


async def test_exit_code_of_a_session(client: AgentClient) -> None:
    async with client.attach(["sh", "-c", "echo bye; exit 5"]) as tty:
        chunks = [c async for c in tty]
        assert b"bye" in b"".join(chunks)
        assert tty.exit_code == 5


async def test_initial_size_and_resize(client: AgentClient) -> None:
    async with client.attach(["sh"], rows=31, cols=101) as tty:
        await tty.write(b"stty size\n")
        await read_until(tty, rb"31 101")
        await tty.resize(50, 132)
        await tty.write(b"stty size\n")
        await read_until(tty, rb"50 132")
        await tty.kill()


async def test_kill_sends_sigterm(client: AgentClient) -> None:
    async with client.attach(["sleep", "60"]) as tty:
        info = await find_session(client, "sleep 60")
        assert info.running
        await tty.kill()
        code = await asyncio.wait_for(tty.wait(), 10)
    assert code == 128 + 15


async def test_detach_keeps_running_and_reattach_replays_scrollback(
    client: AgentClient,
) -> None:
    script = "echo first-line; sleep 0.5; echo second-line; exec sleep 60"
    async with client.attach(["sh", "-c", script]) as tty:
        await read_until(tty, rb"first-line")
    # Detached by leaving the block; the session keeps running and filling scrollback.
    info = await find_session(client, "second-line")
    assert info.running
    assert info.tty
    await asyncio.sleep(1.0)
    listed = await find_session(client, "second-line")
    assert not listed.attached

    async with client.attach(session_id=info.session_id) as again:
        assert again.info is not None
        assert again.info.session_id == info.session_id
        assert again.session_id == info.session_id
        replay = await read_until(again, rb"second-line")
        assert b"first-line" in replay
        attached = await find_session(client, "second-line")
        assert attached.attached
        await again.kill()
        assert await asyncio.wait_for(again.wait(), 10) == 128 + 15

    done = await client.list_sessions()
    assert all(s.session_id != info.session_id or not s.running for s in done)


async def test_reattach_scrollback_is_one_frame_before_live_output(client: AgentClient) -> None:
    async with client.attach(["sh", "-c", "echo aaa; echo bbb; exec sleep 60"]) as tty:
        await read_until(tty, rb"bbb")
    info = await find_session(client, "echo aaa")
    async with client.attach(session_id=info.session_id) as again:
        first = await asyncio.wait_for(anext(again), 10)
        assert b"aaa" in first
        assert b"bbb" in first
        await client.kill_session(info.session_id)


async def test_second_attach_disconnects_the_first(client: AgentClient) -> None:
    async with client.attach(["sh", "-c", "echo up; exec sleep 60"]) as first:
        await read_until(first, rb"up")
        info = await find_session(client, "echo up")
        async with client.attach(session_id=info.session_id) as second:
            # The first client's stream ends (EXIT, then the agent closes it).
            async def drain() -> None:
                async for _ in first:
                    pass

            await asyncio.wait_for(drain(), 10)
            assert first.taken_over
            assert first.exit_code is None  # not an exit status: the session lives on
            assert second.info is not None
            assert second.info.running
            await client.kill_session(info.session_id)


async def test_list_and_kill_sessions(client: AgentClient) -> None:
    before = {s.session_id for s in await client.list_sessions()}
    async with client.attach(["sh", "-c", "echo $$; exec sleep 61"]) as tty:
        out = await read_until(tty, rb"\d+\r?\n")
        pid = int(re.findall(rb"(\d+)\r?\n", out)[0])
    try:
        info = await find_session(client, "sleep 61")
        assert info.session_id not in before
        assert info.running
        assert info.exit_code is None
        assert info.created_at > 0
        await client.kill_session(info.session_id)
        await wait_dead(pid)
        after = {s.session_id: s for s in await client.list_sessions()}
        assert info.session_id not in after or not after[info.session_id].running
    finally:
        kill_quietly(pid)


async def test_multiple_sessions_have_distinct_ids(client: AgentClient) -> None:
    async with (
        client.attach(["sh", "-c", "echo one; exec sleep 62"]) as a,
        client.attach(["sh", "-c", "echo two; exec sleep 63"]) as b,
    ):
        await read_until(a, rb"one")
        await read_until(b, rb"two")
        ids = {(await find_session(client, m)).session_id for m in ("sleep 62", "sleep 63")}
        assert len(ids) == 2
        await a.kill()
        await b.kill()


async def test_reattach_unknown_session(client: AgentClient) -> None:
    with pytest.raises(RemoteError):
        async with client.attach(session_id="no-such-session"):
            pass


async def test_kill_unknown_session(client: AgentClient) -> None:
    with pytest.raises(RemoteError):
        await client.kill_session("no-such-session")


async def test_attach_argument_checks(client: AgentClient) -> None:
    with pytest.raises(ValueError):
        client.attach(["sh"], session_id="s1")


async def test_detach_from_another_task_ends_iteration(client: AgentClient) -> None:
    async with client.attach(["sh", "-c", "echo hi; exec sleep 60"]) as tty:
        await read_until(tty, rb"hi")

        async def consume() -> list[bytes]:
            return [chunk async for chunk in tty]

        reader = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        tty.detach()
        assert await asyncio.wait_for(reader, 5) == []
        assert tty.exit_code is None
    assert tty.session_id is not None
    info = await find_session(client, "echo hi")
    assert info.running  # detaching never stops the process
    await client.kill_session(info.session_id)


async def test_input_after_exit_is_dropped(client: AgentClient) -> None:
    async with client.attach(["true"]) as tty:
        assert await asyncio.wait_for(tty.wait(), 10) == 0
        await tty.write(b"nobody reads this\n")
        await tty.resize(10, 10)
        await tty.kill()


async def test_command_that_cannot_start(client: AgentClient) -> None:
    async with client.attach(["/no/such/shell"]) as tty:
        out = b"".join([chunk async for chunk in tty])
    assert tty.exit_code == 127
    assert b"not found" in out
