"""``files.download_archive`` / ``upload_archive`` (sync and async) against a real daemon."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from kiln.sdk import AsyncKiln, NotFound, Sandbox, ValidationError

from .conftest import Daemon, unique


def tar_of(*members: tuple[str, bytes, int]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_upload_and_download_archives(sb: Sandbox, daemon: Daemon) -> None:
    workdir = daemon.workdir(sb.id)
    body = tar_of(("d/a.txt", b"alpha", 0o600), ("d/b.sh", b"#!/bin/sh\n", 0o755))
    # From bytes, and from a file object streamed in chunks.
    assert sb.files.upload_archive(".", body) == 2
    assert sb.files.upload_archive(str(workdir), io.BytesIO(body)) == 2
    assert (workdir / "d" / "a.txt").read_bytes() == b"alpha"
    assert (workdir / "d" / "b.sh").stat().st_mode & 0o777 == 0o755
    with sb.files.download_archive("d") as archive:
        assert (archive.root, archive.stat.is_dir) == ("d", True)
        data = b"".join(archive)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert sorted(tar.getnames()) == ["d", "d/a.txt", "d/b.sh"]
        assert tar.getmember("d/a.txt").mode == 0o600
    with pytest.raises(NotFound):
        sb.files.download_archive("no-such").open()
    with pytest.raises(NotFound):
        sb.files.upload_archive("no-such-dir", body)
    with pytest.raises(ValidationError, match="not a directory"):
        sb.files.upload_archive("d/a.txt", body)
    with pytest.raises(ValidationError, match="absolute"):
        sb.files.upload_archive(".", tar_of(("/etc/evil", b"x", 0o644)))
    with pytest.raises(ValidationError, match="not a tar archive"):
        sb.files.upload_archive(".", os.urandom(2048))


async def test_async_archives(akiln: AsyncKiln, daemon: Daemon) -> None:
    sb = await akiln.sandboxes.create(name=unique("async-tar"))
    try:
        chunks = iter(
            [
                tar_of(("x.txt", b"x" * 100_000, 0o640))[i : i + 7000]
                for i in range(0, 110_000, 7000)
            ]
        )
        assert await sb.files.upload_archive(".", chunks) == 1
        async with sb.files.download_archive("x.txt") as archive:
            assert (archive.root, archive.stat.size) == ("x.txt", 100_000)
            data = b"".join([chunk async for chunk in archive])
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.getmember("x.txt")
            assert member.mode == 0o640
            assert tar.extractfile(member).read() == b"x" * 100_000  # type: ignore[union-attr]
    finally:
        await sb.delete()
