"""The member rules, in-process (pure logic)."""

from __future__ import annotations

import pytest

from kiln.archive import MemberRules, UnsafeArchive
from kiln.archive.rules import Kind


def accept(members: list[tuple[Kind, str, str]]) -> list[str]:
    rules = MemberRules()
    return [rules.check(kind, name, link) for kind, name, link in members]


def test_an_ordinary_tree_is_accepted_and_normalised() -> None:
    names = accept(
        [
            (Kind.DIR, "./", ""),
            (Kind.DIR, "./dir/", ""),
            (Kind.FILE, "./dir/a.txt", ""),
            (Kind.SYMLINK, "dir/link", "a.txt"),
            (Kind.SYMLINK, "dir/up", "../dir/a.txt"),
            (Kind.SYMLINK, "dir/self", "."),
            (Kind.HARDLINK, "dir/hard", "dir/a.txt"),
            (Kind.FIFO, "dir//fifo", ""),
        ]
    )
    assert names == [
        ".",
        "dir",
        "dir/a.txt",
        "dir/link",
        "dir/up",
        "dir/self",
        "dir/hard",
        "dir/fifo",
    ]


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([(Kind.FILE, "/etc/passwd", "")], "absolute"),
        ([(Kind.FILE, "../x", "")], "'..'"),
        ([(Kind.FILE, "a/../../x", "")], "'..'"),
        ([(Kind.FILE, ".", "")], "replace the destination"),
        ([(Kind.SYMLINK, "l", "/etc")], "absolute"),
        ([(Kind.SYMLINK, "l", "..")], "outside"),
        ([(Kind.SYMLINK, "a/l", "../../x")], "outside"),
        ([(Kind.SYMLINK, "l", "")], "empty target"),
        # A later member through an earlier symlink, even one pointing inside.
        ([(Kind.SYMLINK, "l", "sub"), (Kind.FILE, "l/x", "")], "passes through"),
        # A symlink that stays inside lexically but escapes through another one.
        ([(Kind.SYMLINK, "d/up", ".."), (Kind.SYMLINK, "d/z", "up/..")], "outside"),
        # A directory that a '..' relied on cannot become a symlink afterwards.
        ([(Kind.SYMLINK, "a", "u/.."), (Kind.SYMLINK, "u", ".")], "replace an earlier"),
        ([(Kind.FILE, "x", ""), (Kind.SYMLINK, "x", ".")], "replace an earlier"),
        ([(Kind.SYMLINK, "x", "y"), (Kind.FILE, "x", "")], "replace a symlink"),
        ([(Kind.HARDLINK, "h", "/etc/shadow")], "absolute"),
        ([(Kind.HARDLINK, "h", "missing")], "earlier file"),
        ([(Kind.SYMLINK, "s", "t"), (Kind.HARDLINK, "h", "s")], "earlier file"),
    ],
)
def test_escapes_are_refused(members: list[tuple[Kind, str, str]], reason: str) -> None:
    with pytest.raises(UnsafeArchive, match=reason):
        accept(members)
