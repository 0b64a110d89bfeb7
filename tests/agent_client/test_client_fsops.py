"""mkdir, move, remove, watch and the user/depth options through the client."""

from __future__ import annotations

import asyncio
import os
import pwd
from pathlib import Path

import pytest

from kiln.agent_client import (
    AgentClient,
    RemoteExists,
    RemoteNotADirectory,
    RemoteNotFound,
    RemotePermissionDenied,
)
from kiln.protocol import FileEvent


@pytest.fixture
def client(shared_client: AgentClient) -> AgentClient:
    return shared_client


async def test_mkdir_move_remove_round_trip(client: AgentClient, workdir: Path) -> None:
    made = await client.mkdir(str(workdir / "a" / "b"), mode=0o700)
    assert made.created is True
    assert made.info.is_dir and made.info.mode == "0700"
    assert (await client.mkdir(str(workdir / "a" / "b"))).created is False
    await client.write_file(str(workdir / "a" / "b" / "f"), b"data")
    moved = await client.move(str(workdir / "a" / "b" / "f"), str(workdir / "c" / "g"))
    assert moved.path == str(workdir / "c" / "g")
    assert (await client.read_file(str(workdir / "c" / "g"))).data == b"data"
    await client.remove(str(workdir / "a"), recursive=True)
    assert sorted(os.listdir(workdir)) == ["c"]


async def test_errors_become_their_classes(client: AgentClient, workdir: Path) -> None:
    (workdir / "f").write_text("x")
    (workdir / "g").write_text("y")
    with pytest.raises(RemoteExists):
        await client.move(str(workdir / "f"), str(workdir / "g"))
    with pytest.raises(RemoteExists):
        await client.mkdir(str(workdir / "f"))
    with pytest.raises(RemoteNotFound):
        await client.remove(str(workdir / "missing"))
    with pytest.raises(RemoteNotFound):
        await client.move(str(workdir / "missing"), str(workdir / "x"))
    with pytest.raises(RemoteNotADirectory):
        await client.ls(str(workdir / "f"), depth=2)
    with pytest.raises(ValueError, match="depth"):
        await client.ls(str(workdir), depth=0)
    assert (workdir / "g").read_text() == "y"


async def test_ls_depth_and_details(client: AgentClient, workdir: Path) -> None:
    (workdir / "d" / "e").mkdir(parents=True)
    (workdir / "d" / "e" / "f").write_text("x")
    listing = await client.ls(str(workdir), depth=3, details=True)
    assert [e.path for e in listing.entries] == [
        str(workdir / "d"),
        str(workdir / "d" / "e"),
        str(workdir / "d" / "e" / "f"),
    ]
    assert [e.type for e in listing.entries] == ["dir", "dir", "file"]
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert {e.owner for e in listing.entries} == {me}
    info = await client.stat(str(workdir / "d"), details=True)
    assert info.permissions is not None and info.permissions.startswith("d")


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as a user needs root")
async def test_as_a_user(client: AgentClient, workdir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    with pytest.raises(RemotePermissionDenied):
        await client.write_file(str(workdir / "denied"), b"x", user="nobody")
    with pytest.raises(RemotePermissionDenied):
        await client.mkdir(str(workdir / "denied"), user="nobody")
    os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
    for parent in workdir.parents:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    await client.write_file(str(workdir / "mine"), b"x", user="nobody")
    assert (workdir / "mine").stat().st_uid == nobody.pw_uid
    assert (await client.read_file(str(workdir / "mine"), user="nobody")).data == b"x"
    info = await client.stat(str(workdir / "mine"), user="nobody", details=True)
    assert info.owner == "nobody"


async def test_watch(client: AgentClient, workdir: Path) -> None:
    events: list[FileEvent] = []
    async with client.watch_dir(str(workdir), recursive=True) as watch:
        await client.write_file(str(workdir / "new.txt"), b"hello")
        async with asyncio.timeout(5):
            async for event in watch:
                events.append(event)
                if event == FileEvent("new.txt", "write"):
                    break
    assert events == [FileEvent("new.txt", "create"), FileEvent("new.txt", "write")]
    with pytest.raises(RemoteNotFound):
        async with client.watch_dir(str(workdir / "missing")):
            pass


async def test_watch_ends_when_the_directory_goes(client: AgentClient, workdir: Path) -> None:
    (workdir / "w").mkdir()
    async with client.watch_dir(str(workdir / "w")) as watch:
        await client.remove(str(workdir / "w"), recursive=True)
        async with asyncio.timeout(5):
            rest = [event async for event in watch]
    assert all(event.type == "remove" for event in rest)
