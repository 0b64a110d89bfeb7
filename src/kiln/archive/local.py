"""Local files to a tar stream and back, for ``kiln cp`` (blocking; the CLI is synchronous).

:func:`pack` walks a local file or directory and yields a tar stream in
chunks, reading files a block at a time (never a whole file in memory).
:func:`extract` unpacks a tar stream read from a file object into a local
directory with :mod:`tarfile`, member by member as it arrives, after the
:mod:`.rules` checks and a check against the real destination (no member may
land, or point, outside it through a symlink already there). Modes and
modification times are kept; owners are not (files belong to whoever runs
``kiln cp``, as with ``docker cp``).
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from typing import IO, Any, Final, Protocol, cast

from .errors import UnsafeArchive
from .rules import Kind, MemberRules

READ_BLOCK: Final = 256 * 1024
_BLOCK: Final = 512


def tree_size(path: str) -> int:
    """Bytes of file content under ``path`` (what a progress bar counts)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files:
            with_path = os.path.join(root, name)
            try:
                st = os.lstat(with_path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
        dirs.sort()
    return total


def _info(path: str, arcname: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(arcname)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        raise UnsafeArchive(f"{path}: only files, directories, symlinks and fifos are copied")
    return info


def _entries(path: str, arcname: str) -> Iterator[tuple[str, str, os.stat_result]]:
    st = os.lstat(path)
    yield path, arcname, st
    if not stat.S_ISDIR(st.st_mode):
        return
    with os.scandir(path) as it:
        children = sorted(it, key=lambda e: e.name)
    for entry in children:
        yield from _entries(entry.path, f"{arcname}/{entry.name}" if arcname != "." else entry.name)


def pack(path: str, arcname: str) -> Iterator[bytes]:
    """``path`` (a file, a symlink or a directory tree) as a tar stream whose top
    member is ``arcname`` (``"."``: a directory's content without the directory)."""
    for source, name, st in _entries(path, arcname):
        info = _info(source, name, st)
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if info.type != tarfile.REGTYPE:
            continue
        left = info.size
        with open(source, "rb") as f:
            while left > 0:
                block = f.read(min(READ_BLOCK, left))
                if not block:  # the file shrank while we read it: keep the declared size
                    block = bytes(min(READ_BLOCK, left))
                left -= len(block)
                yield block
        yield bytes(-info.size % _BLOCK)
    yield bytes(2 * _BLOCK)


def top_name(name: str) -> str:
    """The first component of a member name (``"./a/b"`` → ``"a"``; ``"."`` for ``"./"``)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return parts[0] if parts else "."


def _rename_top(name: str, old: str, new: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if old == ".":
        return "/".join([new, *parts])
    if parts and parts[0] == old:
        parts[0] = new
    return "/".join(parts)


_KINDS: Final = {
    tarfile.REGTYPE: Kind.FILE,
    tarfile.AREGTYPE: Kind.FILE,
    tarfile.CONTTYPE: Kind.FILE,
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.LNKTYPE: Kind.HARDLINK,
    tarfile.FIFOTYPE: Kind.FIFO,
}


#: tarfile leaves the owner alone when these are None (typeshed says int and str).
_NO_OWNER: Final[dict[str, Any]] = {"uid": None, "gid": None, "uname": None, "gname": None}


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


class _Guard:
    """The tarfile extraction filter: the rules, the top-level rename, the real
    destination, and no owners."""

    def __init__(self, dest: str, rename: tuple[str, str] | None) -> None:
        self.rules = MemberRules()
        self.rename = rename
        self.root = os.path.realpath(dest)

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        kind = _KINDS.get(member.type)
        if kind is None:
            raise UnsafeArchive(f"{member.name!r}: this kind of member is not copied")
        name, linkname = member.name, member.linkname
        if self.rename is not None:
            name = _rename_top(name, *self.rename)
            if kind is Kind.HARDLINK:
                linkname = _rename_top(linkname, *self.rename)
        name = self.rules.check(kind, name, linkname)
        target = os.path.realpath(os.path.join(self.root, name))
        if not _inside(self.root, target):
            raise UnsafeArchive(f"{member.name!r} would land outside {self.root}")
        if kind is Kind.SYMLINK:
            pointed = os.path.realpath(os.path.join(self.root, os.path.dirname(name), linkname))
            if not _inside(self.root, pointed):
                raise UnsafeArchive(f"symlink {member.name!r} points outside {self.root}")
        elif kind is Kind.HARDLINK:
            linked = os.path.realpath(os.path.join(self.root, linkname))
            if not _inside(self.root, linked):
                raise UnsafeArchive(f"hard link {member.name!r} points outside {self.root}")
        return member.replace(name=name, linkname=linkname, deep=False, **_NO_OWNER)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def extract(source: Readable, dest: str, rename: tuple[str, str] | None = None) -> int:
    """Extract the tar stream ``source`` into the existing directory ``dest``; with
    ``rename`` (old, new) the top-level member ``old`` becomes ``new``. The number of
    members extracted."""
    guard = _Guard(dest, rename)
    count = 0

    def counted(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        nonlocal count
        checked = guard(member, path)
        count += 1
        return checked

    try:
        stream = cast(IO[bytes], source)  # tarfile's stream mode only ever calls read()
        with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tar:
            tar.extractall(guard.root, filter=counted)
    except tarfile.ReadError as exc:
        raise UnsafeArchive(f"not a tar archive: {exc}") from None
    return count
