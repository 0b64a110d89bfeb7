"""The pure output bounds of the MCP tools."""

from __future__ import annotations

import doctest

import pytest

from kiln.mcp_server import bounds
from kiln.mcp_server.bounds import clip_middle, decode_text, last_lines, utf8_boundary


def test_doctests() -> None:
    assert doctest.testmod(bounds).failed == 0


def test_clip_middle_leaves_short_text_alone() -> None:
    assert clip_middle("short", 5) == ("short", False)


@pytest.mark.parametrize("limit", [100, 1000, 20_000])
def test_clip_middle_keeps_both_ends_within_about_the_limit(limit: int) -> None:
    text = "".join(f"line {i}\n" for i in range(50_000))
    clipped, cut = clip_middle(text, limit)
    assert cut
    head, _, tail = clipped.partition("\n[... ")
    omitted = int(tail.split(" ", 1)[0])
    tail = tail.split("omitted ...]\n", 1)[1]
    assert text.startswith(head)
    assert text.endswith(tail)
    assert len(head) + len(tail) + omitted == len(text)
    assert len(head) + len(tail) + 2 == limit
    assert len(tail) > len(head)  # the end says how it went


def test_utf8_boundary_never_splits_a_character() -> None:
    data = "a€b".encode()  # € is three bytes: positions 1, 2, 3
    assert [utf8_boundary(data, end) for end in range(7)] == [0, 1, 1, 1, 4, 5, 5]


def test_decode_text() -> None:
    assert decode_text("héllo".encode(), complete=True) == "héllo"
    assert decode_text(b"ab\x00cd", complete=True) is None
    assert decode_text(b"\xff\xfe", complete=True) is None
    cut = "é".encode()[:1]
    assert decode_text(b"ok" + cut, complete=False) == "ok"  # a prefix cut mid-character
    assert decode_text(b"ok" + cut, complete=True) is None


def test_last_lines() -> None:
    assert last_lines("a\nb\nc", 2) == "b\nc"
    assert last_lines("a\nb\n", 5) == "a\nb\n"
    assert last_lines("a\n", 0) == ""
