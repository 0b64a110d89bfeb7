"""The "newc" cpio format (what the Linux kernel unpacks as an initramfs).

Each member is a 110-byte ASCII header (magic ``070701`` and 13 eight-digit hex
fields), the NUL-terminated name padded to a multiple of 4 bytes, then the data
padded to a multiple of 4 bytes. The archive ends with a member named
``TRAILER!!!``. Symlinks store their target as data; device nodes carry
``rdevmajor``/``rdevminor``.

The writer is deterministic: members are sorted by name (so a directory always
precedes its contents), inode numbers are assigned in that order, and every
member's mtime defaults to 0. No compression: the kernel then only has to copy.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_LEN = 110
_FIELDS = 13


@dataclass(frozen=True, slots=True)
class Member:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFREG`` ...)."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> Member:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> Member:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> Member:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> Member:
        return cls(name, stat.S_IFCHR | perm, rdevmajor=major, rdevminor=minor)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(fields: Iterable[int]) -> bytes:
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def write_newc(members: Iterable[Member]) -> bytes:
    """Serialise ``members``, sorted by name, as a newc archive."""
    named = sorted(((m.name.strip("/"), m) for m in members), key=lambda nm: nm[0])
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("duplicate member names in cpio archive")
    out = bytearray()
    for ino, (name, m) in enumerate(named, start=1):
        if not name or name == TRAILER:
            raise ValueError(f"bad cpio member name {m.name!r}")
        if not stat.S_ISREG(m.mode) and not stat.S_ISLNK(m.mode) and m.data:
            raise ValueError(f"{name}: only files and symlinks carry data")
        out += _entry(ino, m, name)
    out += _entry(0, Member(TRAILER, 0), TRAILER)
    return bytes(out)


def _entry(ino: int, m: Member, name: str) -> bytes:
    raw_name = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(m.mode) else 1
    size = len(m.data)
    fields = (ino, m.mode, m.uid, m.gid, nlink, m.mtime, size, 0, 0, m.rdevmajor, m.rdevminor)
    head = _header((*fields, len(raw_name), 0)) + raw_name
    return head + _pad4(len(head)) + m.data + _pad4(size)


def read_newc(archive: bytes) -> list[Member]:
    """Parse a newc archive back into members (without the trailer)."""
    members: list[Member] = []
    pos = 0
    while True:
        if archive[pos : pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        raw = archive[pos + 6 : pos + HEADER_LEN]
        if len(raw) != 8 * _FIELDS:
            raise ValueError("truncated cpio header")
        f = [int(raw[i * 8 : i * 8 + 8], 16) for i in range(_FIELDS)]
        _ino, mode, uid, gid, _nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _ = f
        name_start = pos + HEADER_LEN
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize
        data_start += -data_start % 4
        data = archive[data_start : data_start + size]
        if len(data) != size:
            raise ValueError(f"truncated data for {name!r}")
        pos = data_start + size
        pos += -pos % 4
        if name == TRAILER:
            return members
        members.append(Member(name, mode, data, uid, gid, mtime, rmaj, rmin))
