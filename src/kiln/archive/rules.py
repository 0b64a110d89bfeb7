"""Which members of a tar archive may be extracted into a destination directory.

The checks are lexical: they see the archive, not the destination's filesystem
(the daemon checks an upload before it reaches the sandbox; the command line adds
a ``realpath`` check against the real destination when it extracts, see
:mod:`.local`). So that a symlink made by one member cannot redirect a later
one, a member's path may not pass through a symlink of the archive, a symlink
may not replace any earlier member (or a directory that an earlier symlink's
``..`` stepped out of), and a symlink's target is resolved through the
archive's earlier symlinks before it is judged.
"""

from __future__ import annotations

from enum import StrEnum

from .errors import UnsafeArchive


class Kind(StrEnum):
    FILE = "file"
    DIR = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hard link"
    FIFO = "fifo"


def _parts(name: str, what: str) -> list[str]:
    """The components of a member name; absolute names and ``..`` are refused."""
    if not name:
        raise UnsafeArchive(f"{what} has an empty name")
    if name.startswith("/"):
        raise UnsafeArchive(f"{what} {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{what} {name!r} contains '..'")
    return parts


class MemberRules:
    """The rules for one archive, fed its members in order."""

    __slots__ = ("_links", "_relied", "_seen")

    def __init__(self) -> None:
        #: symlink member → where it points, resolved to components below the root
        self._links: dict[str, tuple[str, ...]] = {}
        self._seen: set[str] = set()
        #: directories an earlier symlink's ``..`` stepped out of: they must stay directories
        self._relied: set[str] = set()

    def check(self, kind: Kind, name: str, linkname: str = "") -> str:
        """Refuse (:class:`UnsafeArchive`) or accept a member; the normalised name
        (``"."`` for the destination itself) when accepted."""
        parts = _parts(name, kind.value)
        key = "/".join(parts) or "."
        if key == "." and kind is not Kind.DIR:
            raise UnsafeArchive(f"{kind.value} {name!r} would replace the destination")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self._links:
                raise UnsafeArchive(f"{name!r} passes through the symlink {prefix!r}")
        if key in self._links:
            raise UnsafeArchive(f"{name!r} would replace a symlink of the same archive")
        if kind is Kind.SYMLINK:
            if key in self._seen or key in self._relied:
                raise UnsafeArchive(f"symlink {name!r} would replace an earlier member")
            self._links[key] = self._resolve(parts[:-1], linkname, name)
        elif kind is Kind.HARDLINK:
            target = "/".join(_parts(linkname, "hard link target")) or "."
            if target not in self._seen or target in self._links:
                raise UnsafeArchive(
                    f"hard link {name!r} must point to an earlier file of the archive, "
                    f"not {linkname!r}"
                )
        for i in range(1, len(parts)):
            self._seen.add("/".join(parts[:i]))
        self._seen.add(key)
        return key

    def _resolve(self, where: list[str], target: str, name: str) -> tuple[str, ...]:
        if not target:
            raise UnsafeArchive(f"symlink {name!r} has an empty target")
        if target.startswith("/"):
            raise UnsafeArchive(f"symlink {name!r} points to the absolute path {target!r}")
        current = list(where)
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    raise UnsafeArchive(
                        f"symlink {name!r} points outside the destination ({target!r})"
                    )
                self._relied.add("/".join(current))
                current.pop()
                continue
            current.append(part)
            resolved = self._links.get("/".join(current))
            if resolved is not None:
                current = list(resolved)
        return tuple(current)
