"""The asyncio SDK against a real daemon: the same API, awaited."""

from __future__ import annotations

import asyncio
import io
import os

import pytest

from kiln.sdk import AsyncKiln, Exit, NotFound, Stderr, Stdout, ValidationError

from .conftest import Daemon, unique


async def test_async_lifecycle_exec_files(akiln: AsyncKiln, daemon: Daemon) -> None:
    assert (await akiln.health()).status == "ok"
    sb = await akiln.sandboxes.create(name=unique("async"))
    try:
        assert (await akiln.sandboxes.get(sb.name)).id == sb.id
        assert sb.id in [s.id for s in await akiln.sandboxes.list()]

        result = await sb.exec(["sh", "-c", "echo hi; exit 4"])
        assert (result.exit_code, result.stdout) == (4, "hi\n")

        events = [e async for e in sb.exec_stream("printf o; printf e >&2")]
        assert Stdout(b"o") in events and Stderr(b"e") in events
        assert events[-1] == Exit(0)

        path = f"{daemon.workdir(sb.id)}/f.bin"
        await sb.files.write(path, io.BytesIO(b"\x00" * 70_000), mode="0640")
        content = await sb.files.read(path)
        assert (len(content.data), content.size, content.truncated) == (70_000, 70_000, False)
        assert (await sb.files.stat(path)).mode == "0640"
        assert [e.name for e in (await sb.files.ls(path.rsplit("/", 1)[0])).entries] == [
            "config.json",
            "f.bin",
        ]
        renamed = await sb.update(name=sb.name + "-r")
        assert renamed.name == sb.name + "-r"
    finally:
        await sb.delete()
    with pytest.raises(NotFound):
        await akiln.sandboxes.get(sb.id)


async def test_async_stream_close_early(akiln: AsyncKiln) -> None:
    sb = await akiln.sandboxes.create(name=unique("async"))
    try:
        async with sb.exec_stream(["sh", "-c", "echo a; sleep 30"]) as events:
            assert await anext(events) == Stdout(b"a\n")
        # The next exec works at once: the closed stream left nothing hanging.
        assert (await asyncio.wait_for(sb.exec(["true"]), 10)).exit_code == 0
    finally:
        await sb.delete()


async def test_async_shell(akiln: AsyncKiln) -> None:
    sb = await akiln.sandboxes.create(name=unique("async"))
    try:
        shell = await sb.shell(cmd="sh")
        async with shell:
            assert shell.session_id
            await shell.send(b"echo $((40 + 2)); exit 5\n")
            seen = b"".join([chunk async for chunk in shell])
        assert b"42" in seen, (seen, shell.error, shell.exit_code)
        assert shell.exit_code == 5
        sessions = await sb.sessions.list()
        assert any(s.session_id == shell.session_id and not s.running for s in sessions)
    finally:
        await sb.delete()


async def test_async_unknown_sandbox(akiln: AsyncKiln) -> None:
    ref = akiln.sandboxes.ref("nope-nope")
    with pytest.raises(NotFound):
        await ref.exec(["true"])
    with pytest.raises(NotFound):
        await ref.shell()


async def test_async_exec_and_shell_as_root(akiln: AsyncKiln) -> None:
    sb = await akiln.sandboxes.create(name=unique("asroot"))
    try:
        with pytest.raises(ValidationError, match="'root' or 'sandbox'"):
            await sb.exec(["true"], user="nobody")
        me = f"{os.geteuid()}\n"
        assert (await sb.exec(["id", "-u"], user="sandbox")).stdout == me
        if os.geteuid() != 0:
            pytest.skip("only a root agent can run commands as root")
        assert (await sb.exec(["id", "-u"], user="root")).stdout == "0\n"
        async with sb.exec_stream(["id", "-un"], user="root") as events:
            assert [e async for e in events] == [Stdout(b"root\n"), Exit(0)]
        async with await sb.shell(cmd="sh", user="root") as shell:
            await shell.send(b"echo uid=$(id -u)=; exit\n")
            seen = b"".join([chunk async for chunk in shell])
        assert b"uid=0=" in seen, seen
    finally:
        await sb.delete()


async def test_async_file_operations(akiln: AsyncKiln, daemon: Daemon) -> None:
    sb = await akiln.sandboxes.create(name=unique("afs"))
    try:
        base = str(daemon.workdir(sb.id))
        assert await sb.files.mkdir(f"{base}/d") is True
        async with sb.files.watch(f"{base}/d") as watch:
            await sb.files.write(f"{base}/d/x", b"1")
            moved = await sb.files.move(f"{base}/d/x", f"{base}/d/y")
            assert moved.path == f"{base}/d/y"
            events = []
            async for event in watch:
                events.append((event.name, event.type))
                if event.name == "y":
                    break
        assert events == [("x", "create"), ("x", "write"), ("x", "rename"), ("y", "create")]
        listing = await sb.files.ls(base, depth=2)
        assert f"{base}/d/y" in [e.path for e in listing.entries]
        await sb.files.remove(f"{base}/d", recursive=True)
        with pytest.raises(NotFound):
            await sb.files.remove(f"{base}/d")
    finally:
        await sb.delete()
