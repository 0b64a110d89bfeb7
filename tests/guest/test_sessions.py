"""TTY sessions against a real test-mode agent."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.protocol import FrameType, decode_exit, encode_resize

from ._wire import Conn, collect, exec_req, request
from .conftest import Guest


async def open_session(agent: Any, cmd: list[str], **fields: Any) -> tuple[Conn, dict[str, Any]]:
    conn = await Conn.open(agent.control, agent.token)
    await conn.send(FrameType.EXEC_REQ, exec_req(cmd, tty=True, **fields))
    info = await conn.expect_json(FrameType.SESSION_INFO)
    return conn, info


async def attach(agent: Any, session_id: str, **fields: Any) -> tuple[Conn, dict[str, Any], bytes]:
    """Attach: SESSION_INFO, then the scrollback as one STDOUT frame."""
    conn = await Conn.open(agent.control, agent.token)
    await conn.send(FrameType.EXEC_REQ, exec_req([], tty=True, session_id=session_id, **fields))
    info = await conn.expect_json(FrameType.SESSION_INFO)
    scrollback = (await conn.expect(FrameType.STDOUT)).payload
    return conn, info, scrollback


async def read_until(conn: Conn, marker: bytes, within: float = 5.0) -> bytes:
    seen = b""
    async with asyncio.timeout(within):
        while marker not in seen:
            frame = await conn.recv(within)
            assert frame is not None, f"closed before {marker!r}; got {seen!r}"
            assert frame.type == FrameType.STDOUT, f"{frame!r} before {marker!r}; got {seen!r}"
            seen += frame.payload
    return seen


async def sessions(agent: Any) -> dict[str, dict[str, Any]]:
    frame = await request(agent, FrameType.EXEC_LIST_REQ)
    assert frame.type == FrameType.EXEC_LIST_RESP
    return {s["session_id"]: s for s in json.loads(frame.payload)}


async def exec_kill(agent: Any, session_id: str) -> None:
    frame = await request(agent, FrameType.EXEC_KILL, {"session_id": session_id})
    assert frame.type == FrameType.EXIT and decode_exit(frame.payload) == 0


async def test_create_relay_and_kill_sends_sigterm(guest: Guest) -> None:
    conn, info = await open_session(guest, ["cat"])
    async with conn:
        assert re.fullmatch(r"s\d+", info["session_id"])
        assert info["tty"] is True and info["running"] is True and info["attached"] is True
        assert info["argv"] == "cat"
        await conn.send(FrameType.STDIN, b"hello\n")
        await read_until(conn, b"hello")
        await conn.send(FrameType.KILL)
        result = await collect(conn)
    assert result.code == 128 + signal.SIGTERM


async def test_child_has_a_controlling_terminal(guest: Guest) -> None:
    cmd = ["sh", "-c", "test -t 0 && test -t 1 && exec </dev/tty && echo ctty-ok"]
    conn, _info = await open_session(guest, cmd)
    async with conn:
        result = await collect(conn)
    assert b"ctty-ok" in result.stdout
    assert result.code == 0


async def test_initial_size_and_resize(guest: Guest) -> None:
    cmd = ["sh", "-c", "stty size; read x; stty size"]
    conn, _info = await open_session(guest, cmd, rows=30, cols=100)
    async with conn:
        await read_until(conn, b"30 100")
        await conn.send(FrameType.RESIZE, encode_resize(40, 120))
        await conn.send(FrameType.STDIN, b"\n")
        result = await collect(conn)
    assert b"40 120" in result.stdout
    assert result.code == 0


async def test_exit_sends_remaining_output_then_exit_code(guest: Guest) -> None:
    conn, info = await open_session(guest, ["sh", "-c", "echo bye; exit 7"])
    async with conn:
        result = await collect(conn)
        assert result.stdout.replace(b"\r\n", b"\n") == b"bye\n"
        assert result.code == 7
        await conn.expect_closed()
    listed = (await sessions(guest))[info["session_id"]]
    assert listed["running"] is False and listed["exit_code"] == 7 and listed["attached"] is False
    await exec_kill(guest, info["session_id"])  # finished: just forgotten
    assert info["session_id"] not in await sessions(guest)


async def test_detach_and_reattach_replays_scrollback(guest: Guest, workdir: Path) -> None:
    flag = workdir / "flag"
    script = (
        f"echo first; while [ ! -e {flag} ]; do sleep 0.01; done; echo late-output;"
        ' read x; echo "got $x"; sleep 30'
    )
    conn, info = await open_session(guest, ["sh", "-c", script])
    sid = info["session_id"]
    await read_until(conn, b"first")
    await conn.close()  # detach: the process keeps running

    await wait_for_listed(guest, sid, attached=False)
    assert (await sessions(guest))[sid]["running"] is True
    flag.touch()  # output produced while detached still fills the ring

    async def scrollback_has_late_output() -> bool:
        conn2, _info, scrollback = await attach(guest, sid)
        await conn2.close()
        return b"late-output" in scrollback

    await poll_async(scrollback_has_late_output)
    conn3, info3, scrollback = await attach(guest, sid)
    async with conn3:
        assert info3["session_id"] == sid and info3["attached"] is True and info3["running"]
        assert scrollback.index(b"first") < scrollback.index(b"late-output")
        await conn3.send(FrameType.STDIN, b"abc\n")
        await read_until(conn3, b"got abc")
    await exec_kill(guest, sid)


async def test_scrollback_keeps_the_last_64_kib(guest: Guest) -> None:
    cmd = [
        "sh",
        "-c",
        f"i=0; while [ $i -lt 3000 ]; do echo line-$i-{'x' * 40}; i=$((i+1)); done;"
        " echo END; sleep 30",
    ]
    conn, info = await open_session(guest, cmd)
    await read_until(conn, b"END", within=10)
    await conn.close()
    conn2, _info, scrollback = await attach(guest, info["session_id"])
    await conn2.close()
    assert len(scrollback) == 64 * 1024
    assert scrollback.rstrip().endswith(b"END")
    assert b"line-2999-" in scrollback and b"line-0-" not in scrollback
    await exec_kill(guest, info["session_id"])


async def test_previous_client_is_kicked_with_exit(guest: Guest) -> None:
    first, info = await open_session(guest, ["cat"])
    sid = info["session_id"]
    second, info2, _scrollback = await attach(guest, sid)
    async with first, second:
        frame = await first.expect(FrameType.EXIT)
        assert decode_exit(frame.payload) == -1
        await first.expect_closed()
        assert info2["attached"] is True
        await second.send(FrameType.STDIN, b"still-alive\n")
        await read_until(second, b"still-alive")
    await exec_kill(guest, sid)


async def test_listing_shows_every_session(guest: Guest) -> None:
    conn1, info1 = await open_session(guest, ["sleep", "30"])
    conn2, info2 = await open_session(guest, ["sh", "-c", "sleep 30"])
    async with conn1, conn2:
        listed = await sessions(guest)
        for info, argv in ((info1, "sleep 30"), (info2, "sh -c 'sleep 30'")):
            entry = listed[info["session_id"]]
            assert entry["argv"] == argv
            assert entry["tty"] is True and entry["running"] is True and entry["attached"] is True
            assert entry["exit_code"] is None and entry["created_at"] > 0
    await exec_kill(guest, info1["session_id"])
    await exec_kill(guest, info2["session_id"])


async def test_exec_kill_sigkills_and_forgets(guest: Guest) -> None:
    conn, info = await open_session(guest, ["sh", "-c", "trap '' TERM; echo ready; sleep 30"])
    async with conn:
        await read_until(conn, b"ready")
        await exec_kill(guest, info["session_id"])
        result = await collect(conn)  # the attached client sees the end
    assert result.code == 128 + signal.SIGKILL
    assert info["session_id"] not in await sessions(guest)


async def test_exec_kill_unknown_session_is_an_error(guest: Guest) -> None:
    frame = await request(guest, FrameType.EXEC_KILL, {"session_id": "s999999"})
    assert frame.type == FrameType.ERROR
    assert b"s999999" in frame.payload


async def test_attach_unknown_session_is_an_error(guest: Guest) -> None:
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req([], tty=True, session_id="nope"))
        assert "nope" in await conn.expect_error()


async def test_attach_to_finished_session_gives_scrollback_and_exit(guest: Guest) -> None:
    conn, info = await open_session(guest, ["sh", "-c", "echo done-output; exit 3"])
    async with conn:
        assert (await collect(conn)).code == 3
    conn2, info2, scrollback = await attach(guest, info["session_id"])
    async with conn2:
        assert info2["running"] is False and info2["exit_code"] == 3
        assert b"done-output" in scrollback
        assert decode_exit((await conn2.expect(FrameType.EXIT)).payload) == 3
    await exec_kill(guest, info["session_id"])


async def test_multiple_concurrent_sessions(guest: Guest) -> None:
    opened = [await open_session(guest, ["cat"]) for _ in range(5)]
    try:
        for i, (conn, _info) in enumerate(opened):
            await conn.send(FrameType.STDIN, f"marker-{i}\n".encode())
        outputs = await asyncio.gather(
            *(read_until(conn, f"marker-{i}".encode()) for i, (conn, _) in enumerate(opened))
        )
        for i, output in enumerate(outputs):
            assert b"marker-" + str(i).encode() in output
            assert all(f"marker-{j}".encode() not in output for j in range(5) if j != i)
    finally:
        for conn, info in opened:
            await conn.close()
            await exec_kill(guest, info["session_id"])


async def test_tty_command_not_found_is_127(guest: Guest) -> None:
    async with await Conn.open(guest.control, guest.token) as conn:
        await conn.send(FrameType.EXEC_REQ, exec_req(["kiln-no-such-command"], tty=True))
        result = await collect(conn)
    assert result.code == 127


async def test_idle_timer_kills_detached_sessions_only(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(extra=["--session-idle-timeout", "0.3"])
    detached, info_detached = await open_session(agent, ["sleep", "30"])
    await detached.close()
    attached, info_attached = await open_session(agent, ["sleep", "30"])
    async with attached:
        await wait_for_listed(agent, info_detached["session_id"], running=False)
        entry = (await sessions(agent))[info_detached["session_id"]]
        assert entry["exit_code"] == 128 + signal.SIGKILL
        # Attached well past the timeout: untouched.
        assert (await sessions(agent))[info_attached["session_id"]]["running"] is True


async def test_reattach_cancels_the_idle_timer(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(extra=["--session-idle-timeout", "1.0"])
    conn, info = await open_session(agent, ["sleep", "30"])
    await conn.close()
    conn2, _info, _scrollback = await attach(agent, info["session_id"])
    async with conn2:
        await asyncio.sleep(1.2)  # the timeout itself is what is tested
        assert (await sessions(agent))[info["session_id"]]["running"] is True


async def test_init_session(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(
        config={"init": "echo init-ran; sleep 30"}, extra=["--session-idle-timeout", "0.2"]
    )
    await wait_for_listed(agent, "init", running=True)
    conn, info, scrollback = await attach(agent, "init")
    async with conn:
        assert info["session_id"] == "init" and info["argv"].startswith("/bin/sh -c")
        if b"init-ran" not in scrollback:  # attached before the script printed it
            await read_until(conn, b"init-ran")
    await asyncio.sleep(0.4)  # detached past the idle timeout: init is exempt
    assert (await sessions(agent))["init"]["running"] is True


async def test_finished_sessions_are_capped(make_agent: Callable[..., Guest]) -> None:
    agent = make_agent(extra=["--max-finished-sessions", "2"])
    ids = []
    for i in range(4):
        conn, info = await open_session(agent, ["sh", "-c", f"exit {i}"])
        async with conn:
            assert (await collect(conn)).code == i
        ids.append(info["session_id"])
    listed = await sessions(agent)
    assert [sid for sid in ids if sid in listed] == ids[2:]


# ---- helpers ---------------------------------------------------------------------


async def wait_for_listed(agent: Any, session_id: str, **expected: Any) -> None:
    async def matches() -> bool:
        entry = (await sessions(agent)).get(session_id)
        return entry is not None and all(entry[k] == v for k, v in expected.items())

    await poll_async(matches)


async def poll_async(check: Callable[[], Any], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)
