"""The streaming tar checker, in-process, with GNU tar as the judge of what it passes."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from kiln.archive import TarScanner, UnsafeArchive
from kiln.archive.scan import format_pax, parse_pax


def make_tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def member(
    name: str, type_: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = type_, link, mode
    info.uid, info.gid, info.uname, info.gname = 4242, 4343, "someone", "others"
    return info


def scan(data: bytes, step: int, uid: int = 1000, gid: int = 1001) -> bytes:
    scanner = TarScanner(uid, gid)
    out = bytearray()
    for i in range(0, len(data), step):
        out += scanner.feed(data[i : i + step])
    out += scanner.close()
    return bytes(out)


TREE = [
    (member("top", tarfile.DIRTYPE, mode=0o755), b""),
    (member("top/" + "long-" * 40 + ".txt"), b"long name\n"),
    (member("top/run.sh", mode=0o755), b"#!/bin/sh\necho hi\n" * 100),
    (member("top/empty", tarfile.DIRTYPE, mode=0o700), b""),
    (member("top/link", tarfile.SYMTYPE, "run.sh"), b""),
    (member("top/big.bin"), os.urandom(70_000)),
    (member("top/ünï"), b"utf-8 name"),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("step", [1, 511, 512, 65536])
def test_a_tree_passes_whole_with_the_owner_rewritten(fmt: int, step: int) -> None:
    members = (
        TREE
        if fmt != tarfile.USTAR_FORMAT
        else [m for m in TREE if len(m[0].name) < 100 and m[0].name.isascii()]
    )
    passed = scan(make_tar(members, fmt), step)
    with tarfile.open(fileobj=io.BytesIO(passed), mode="r:") as tar:
        got = {m.name: (m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar}  # type: ignore[union-attr]
    assert set(got) == {m.name for m, _ in members}
    for info, data in members:
        out, content = got[info.name]
        assert (out.uid, out.gid, out.uname, out.gname) == (1000, 1001, "", "")
        assert (out.mode, out.type, out.linkname, content) == (
            info.mode,
            info.type,
            info.linkname,
            data,
        )


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_gnu_tar_reads_the_passed_stream(tmp_path: Path) -> None:
    passed = scan(make_tar(TREE), 4096, uid=os.getuid(), gid=os.getgid())
    subprocess.run(
        ["tar", "-x", "-f", "-", "-C", str(tmp_path), "--numeric-owner"], input=passed, check=True
    )
    assert (tmp_path / "top/run.sh").stat().st_mode & 0o777 == 0o755
    assert os.readlink(tmp_path / "top/link") == "run.sh"
    assert (tmp_path / "top/big.bin").read_bytes() == TREE[5][1]


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([member("/etc/evil")], "absolute"),
        ([member("a/../../evil")], "'..'"),
        ([member("l", tarfile.SYMTYPE, "/etc")], "absolute"),
        ([member("l", tarfile.SYMTYPE, "../.."), member("l/passwd")], "outside"),
        ([member("dev", tarfile.CHRTYPE)], "character device"),
        ([member("x" * 150 + "/../../../evil")], "'..'"),  # through a pax path record
    ],
)
def test_bad_members_never_pass(members: list[tarfile.TarInfo], reason: str) -> None:
    good = make_tar([(member("fine.txt"), b"ok")])[:1024]  # header and data, no end marker
    bad = make_tar([(m, b"") for m in members])
    scanner = TarScanner(1000, 1000)
    passed = scanner.feed(good)
    with pytest.raises(UnsafeArchive, match=reason):
        passed += scanner.feed(bad)
    # What passed before the refusal is the good member only.
    with tarfile.open(fileobj=io.BytesIO(passed + bytes(1024)), mode="r:") as tar:
        assert tar.getnames() == ["fine.txt"]


def test_the_prefix_field_counts_only_in_posix_headers() -> None:
    # A GNU header keeps other data where ustar has the prefix: GNU tar ignores it
    # there, so the scanner must judge the bare name (here an escaping symlink).
    block = bytearray(tarfile.TarInfo("l").tobuf(tarfile.GNU_FORMAT))
    block[156:157] = tarfile.SYMTYPE
    block[157:159] = b".."
    block[345:348] = b"sub"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
    with pytest.raises(UnsafeArchive, match="outside"):
        TarScanner(0, 0).feed(bytes(block))


def test_malformed_streams_are_refused() -> None:
    with pytest.raises(UnsafeArchive, match="not a tar archive"):
        TarScanner(0, 0).feed(b"x" * 512)
    scanner = TarScanner(0, 0)
    scanner.feed(make_tar([(member("f"), b"12345")])[:600])
    with pytest.raises(UnsafeArchive, match="middle"):
        scanner.close()


def test_a_file_with_content_declared_on_a_directory_is_refused() -> None:
    info = member("d", tarfile.DIRTYPE)
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = b"00000001000\0"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
    with pytest.raises(UnsafeArchive, match="has content"):
        TarScanner(0, 0).feed(bytes(block))


def test_pax_records_round_trip() -> None:
    records = [("path", "x" * 200), ("mtime", "1.5"), ("comment", "ü" * 3)]
    raw = [(k, v.encode()) for k, v in records]
    assert parse_pax(format_pax(raw)) == raw
    for length in range(1, 120):  # record lengths around powers of ten
        one = [("k", b"v" * length)]
        assert parse_pax(format_pax(one)) == one
