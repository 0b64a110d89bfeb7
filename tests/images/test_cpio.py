"""The newc writer: round trips through our reader and through GNU cpio."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from kiln.images.cpio import HEADER_LEN, MAGIC, Member, read_newc, write_newc

MEMBERS = [
    Member.file("init", b"#!/bin/sh\necho hi\n", 0o755),
    Member.directory("bin"),
    Member.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755),
    Member.symlink("bin/sh", "busybox"),
    Member.directory("dev"),
    Member.chardev("dev/console", 5, 1),
    Member.directory("empty"),
    Member.file("empty-file", b""),
]


def test_round_trip_sorted_with_fixed_mtime() -> None:
    archive = write_newc(MEMBERS)
    back = read_newc(archive)
    assert [m.name for m in back] == sorted(m.name for m in MEMBERS)
    assert {m.name: m for m in back} == {m.name: m for m in MEMBERS}
    assert all(m.mtime == 0 for m in back)


def test_deterministic_regardless_of_input_order() -> None:
    assert write_newc(MEMBERS) == write_newc(list(reversed(MEMBERS)))


def test_layout_is_4_byte_aligned_and_ends_with_trailer() -> None:
    archive = write_newc(MEMBERS)
    assert archive.startswith(MAGIC)
    assert len(archive) % 4 == 0
    assert b"TRAILER!!!\0" in archive[-HEADER_LEN - 16 :]
    # every header starts on a 4-byte boundary
    pos = 0
    while (pos := archive.find(MAGIC, pos)) != -1:
        assert pos % 4 == 0
        pos += 1


def test_directories_precede_their_contents() -> None:
    names = [m.name for m in read_newc(write_newc(MEMBERS))]
    assert names.index("bin") < names.index("bin/busybox")
    assert names.index("dev") < names.index("dev/console")


def test_gnu_cpio_lists_it() -> None:
    archive = write_newc(MEMBERS)
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == sorted(m.name for m in MEMBERS)
    verbose = subprocess.run(
        ["cpio", "-tv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    console = next(line for line in verbose.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    link = next(line for line in verbose.splitlines() if "bin/sh" in line)
    assert link.startswith("l") and link.endswith("bin/sh -> busybox")


def test_gnu_cpio_extracts_file_content(tmp_path: Path) -> None:
    dest = tmp_path
    archive = write_newc([m for m in MEMBERS if not stat.S_ISCHR(m.mode)])
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
        input=archive,
        cwd=dest,
        check=True,
    )
    assert (dest / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "init").stat().st_mode & 0o777 == 0o755
    assert (dest / "bin/busybox").read_bytes() == MEMBERS[2].data
    assert (dest / "bin/sh").readlink().as_posix() == "busybox"
    assert (dest / "empty").is_dir()


@pytest.mark.parametrize(
    "members",
    [
        [Member.file("a", b"1"), Member.file("/a/", b"2")],
        [Member.file("", b"x")],
        [Member.file("TRAILER!!!", b"")],
        [Member("d", stat.S_IFDIR | 0o755, b"data")],
    ],
)
def test_rejects_bad_members(members: list[Member]) -> None:
    with pytest.raises(ValueError):
        write_newc(members)


def test_reader_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        read_newc(b"not a cpio archive" * 10)
    with pytest.raises(ValueError):
        read_newc(write_newc(MEMBERS)[:300])
