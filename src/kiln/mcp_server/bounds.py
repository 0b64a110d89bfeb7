"""Keeping tool results small enough for a model's context (pure functions).

An agent reads every byte a tool returns, and a runaway ``cat`` or build log
would push everything else out of its context. So every result that carries
output is bounded, and says so when it was cut, with what to do to see more.
"""

from __future__ import annotations

import codecs


def clip_middle(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to about ``limit`` characters by dropping its middle; whether it was cut.

    A command's first lines say what it did and its last lines how it ended
    (the error, the summary), so both ends are kept: a quarter of the room for
    the head, the rest for the tail.

    >>> clip_middle("abcdefghij", 8)
    ('ab\\n[... 4 characters omitted ...]\\nghij', True)
    """
    if len(text) <= limit:
        return text, False
    head = limit // 4
    tail = limit - head - 2  # room for the two line breaks around the marker
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[-tail:]}", True


def utf8_boundary(data: bytes | bytearray, end: int) -> int:
    """The largest position <= ``end`` that does not split a UTF-8 character of ``data``."""
    end = min(end, len(data))
    # At most three continuation bytes (10xxxxxx) precede a character's last byte.
    for _ in range(3):
        if end <= 0 or end >= len(data) or data[end] & 0xC0 != 0x80:
            break
        end -= 1
    return end


def decode_text(data: bytes, *, complete: bool) -> str | None:
    """``data`` as UTF-8 text, or None when it looks binary (a NUL byte, invalid UTF-8).

    With ``complete=False`` the data is a prefix of a file, so a character cut
    at its end is dropped rather than taken as a sign of binary content.
    """
    if b"\x00" in data:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        return decoder.decode(data, final=complete)
    except UnicodeDecodeError:
        return None


def last_lines(text: str, count: int) -> str:
    """The last ``count`` lines of ``text`` (a final line break does not start a new line).

    >>> last_lines("a\\nb\\nc\\n", 2)
    'b\\nc\\n'
    """
    if count <= 0:
        return ""
    lines = text.splitlines(keepends=True)
    return "".join(lines[-count:])
