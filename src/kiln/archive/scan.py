"""A tar stream checked member by member as it passes, without I/O (sans-IO).

``feed(data)`` returns the bytes that may go on to ``tar -x`` in the sandbox
and raises :class:`UnsafeArchive` *before* returning any byte of a refused
member, so a refused member never reaches the extractor (earlier members of
the same stream may have). ``close()`` returns the end of the archive.

Headers are parsed the way GNU tar reads them (the name prefix only for POSIX
ustar headers; GNU long names and links; pax ``path``, ``linkpath`` and
``size``), so that the name judged here is the name ``tar`` will use. Each
member's owner is rewritten to the given uid/gid (the sandbox user): in the
header, and by dropping owner records from pax headers. Sparse files, devices
and other exotic members are refused; so is any non-file member with content,
which readers disagree about.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import Final

from .errors import UnsafeArchive
from .rules import Kind, MemberRules

BLOCK: Final = 512
#: GNU long names and pax headers are held in memory to be checked: this is the most.
MAX_META: Final = 1 << 20

_KINDS: Final = {
    tarfile.REGTYPE: Kind.FILE,
    tarfile.AREGTYPE: Kind.FILE,
    tarfile.CONTTYPE: Kind.FILE,
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.LNKTYPE: Kind.HARDLINK,
    tarfile.FIFOTYPE: Kind.FIFO,
}
_META: Final = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
)
_OWNER_KEYS: Final = frozenset({"uid", "gid", "uname", "gname"})
_ENC: Final = ("utf-8", "surrogateescape")


def _nts(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(*_ENC)


def _number(field: bytes) -> int:
    """A numeric header field: octal digits, or GNU base-256 (first byte 0x80/0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[:1] == b"\xff" else value
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        raise UnsafeArchive("not a tar archive (bad header)") from None


def _checksum_ok(block: bytes) -> bool:
    blanked = block[:148] + b" " * 8 + block[156:]
    stored = _number(block[148:156])
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def parse_pax(data: bytes) -> list[tuple[str, bytes]]:
    """The records of a pax extended header, in order (``"%d %s=%s\\n"`` each)."""
    records: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data) and data[pos:].strip(b"\0"):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise UnsafeArchive("malformed pax header")
        length = int(data[pos:space])
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise UnsafeArchive("malformed pax header")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise UnsafeArchive("malformed pax header")
        records.append((key.decode(*_ENC), value))
        pos = end
    return records


def format_pax(records: list[tuple[str, bytes]]) -> bytes:
    out = bytearray()
    for key, value in records:
        body = b" " + key.encode(*_ENC) + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length = len(str(length)) + len(body)
        out += str(length).encode() + body
    return bytes(out)


def _with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    return bytes(header)


def _meta_block(header: bytes, data: bytes) -> bytes:
    """A GNU long-name or pax header block (its size set to ``data``'s), then ``data``."""
    block = bytearray(header)
    block[124:136] = _octal(len(data), 12)
    return _with_checksum(block) + data + b"\0" * (-len(data) % BLOCK)


@dataclass
class _Pending:
    """Metadata blocks read ahead of the header they describe."""

    name: str | None = None
    linkname: str | None = None
    size: int | None = None
    blocks: list[bytes] = field(default_factory=list)


class TarScanner:
    """Checks one tar stream; see the module docstring."""

    def __init__(self, uid: int, gid: int) -> None:
        if not (0 <= uid < 8**7 and 0 <= gid < 8**7):
            raise ValueError(f"uid/gid {uid}/{gid} do not fit a tar header")
        self._uid, self._gid = uid, gid
        self._rules = MemberRules()
        self._buf = bytearray()
        self._pending = _Pending()
        #: content bytes (with padding) still to pass through unchanged
        self._passing = 0
        #: a metadata block being collected: its type, size and header
        self._meta: tuple[bytes, int, bytes] | None = None
        self._ended = False
        #: members accepted so far
        self.members = 0

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        view = memoryview(data)
        while view and not self._ended:
            if self._passing:
                n = min(self._passing, len(view))
                out += view[:n]
                view = view[n:]
                self._passing -= n
                continue
            need = self._wanted() - len(self._buf)
            take = view[:need]
            self._buf += take
            view = view[len(take) :]
            if len(self._buf) == self._wanted():
                out += self._complete()
        return bytes(out)

    def close(self) -> bytes:
        """The end of the archive (two zero blocks); refuses a stream cut short."""
        if self._ended:
            return b""
        if self._passing or self._buf or self._meta is not None or self._pending.blocks:
            raise UnsafeArchive("the archive ends in the middle of a member")
        self._ended = True
        return b"\0" * (2 * BLOCK)

    # -- internals --------------------------------------------------------------------

    def _wanted(self) -> int:
        if self._meta is not None:
            size = self._meta[1]
            return size + (-size % BLOCK)
        return BLOCK

    def _complete(self) -> bytes:
        raw = bytes(self._buf)
        self._buf.clear()
        if self._meta is not None:
            type_, size, header = self._meta
            self._meta = None
            self._take_meta(type_, header, raw[:size])
            return b""
        return self._header(raw)

    def _header(self, block: bytes) -> bytes:
        if block == b"\0" * BLOCK:
            if self._pending.blocks:
                raise UnsafeArchive("the archive ends after a header extension")
            self._ended = True
            return b"\0" * (2 * BLOCK)
        if not _checksum_ok(block):
            raise UnsafeArchive("not a tar archive (bad header checksum)")
        size = _number(block[124:136])
        type_ = block[156:157]
        if type_ in _META:
            if not 0 <= size <= MAX_META:
                raise UnsafeArchive(f"a header extension of {size} bytes is too large")
            if size == 0:
                self._take_meta(type_, block, b"")
            else:
                self._meta = (type_, size, block)
            return b""
        return self._member(block, type_, size)

    def _take_meta(self, type_: bytes, header: bytes, data: bytes) -> None:
        pending = self._pending
        if type_ == tarfile.GNUTYPE_LONGNAME:
            pending.name = _nts(data)
            pending.blocks.append(_meta_block(header, data))
        elif type_ == tarfile.GNUTYPE_LONGLINK:
            pending.linkname = _nts(data)
            pending.blocks.append(_meta_block(header, data))
        else:
            records = parse_pax(data)
            for key, value in records:
                if key.startswith("GNU.sparse."):
                    raise UnsafeArchive("sparse files are not supported")
                if type_ == tarfile.XGLTYPE and key in ("path", "linkpath", "size"):
                    raise UnsafeArchive(f"a global pax header must not set {key!r}")
                if key == "path":
                    pending.name = value.decode(*_ENC)
                elif key == "linkpath":
                    pending.linkname = value.decode(*_ENC)
                elif key == "size":
                    if not value.isdigit():
                        raise UnsafeArchive(f"bad pax size {value!r}")
                    pending.size = int(value)
            kept = [(k, v) for k, v in records if k not in _OWNER_KEYS]
            pending.blocks.append(_meta_block(header, format_pax(kept)))

    def _member(self, block: bytes, type_: bytes, size: int) -> bytes:
        pending, self._pending = self._pending, _Pending()
        kind = _KINDS.get(type_)
        if kind is None:
            what = {
                tarfile.CHRTYPE: "character device",
                tarfile.BLKTYPE: "block device",
                tarfile.GNUTYPE_SPARSE: "sparse file",
            }.get(type_, f"member of type {type_!r}")
            raise UnsafeArchive(f"{_nts(block[0:100])!r}: a {what} is not copied")
        magic = block[257:265]
        name = _nts(block[0:100])
        if magic == tarfile.POSIX_MAGIC:
            prefix = _nts(block[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        if pending.name is not None:
            name = pending.name
        if type_ == tarfile.AREGTYPE and name.endswith("/"):
            kind = Kind.DIR  # an old-style directory
        linkname = pending.linkname if pending.linkname is not None else _nts(block[157:257])
        if pending.size is not None:
            size = pending.size
        if size < 0 or (kind is not Kind.FILE and size):
            raise UnsafeArchive(f"{kind.value} {name!r} has content")
        self._rules.check(kind, name, linkname)
        self.members += 1
        self._passing = size + (-size % BLOCK)
        return b"".join(pending.blocks) + self._owned(block, magic)

    def _owned(self, block: bytes, magic: bytes) -> bytes:
        header = bytearray(block)
        header[108:116] = _octal(self._uid, 8)
        header[116:124] = _octal(self._gid, 8)
        if magic in (tarfile.POSIX_MAGIC, tarfile.GNU_MAGIC):
            header[265:297] = bytes(32)  # uname and gname: --numeric-owner ignores them anyway
            header[297:329] = bytes(32)
        return _with_checksum(header)
