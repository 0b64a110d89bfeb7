"""Sans-IO frame codec: ``u32 length | u8 type | payload``.

Nothing here touches a socket: bytes go in with :meth:`FrameDecoder.feed` and
frames come out of :meth:`FrameDecoder.next_frame`, so the same code runs in the
guest agent, in the host client and in tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from .errors import FrameTooLarge, MalformedFrame

#: Largest allowed value of the length field (type byte + payload).
MAX_FRAME: Final = 1 << 20
#: Largest payload that fits in one frame.
MAX_PAYLOAD: Final = MAX_FRAME - 1
#: Output is chunked to this size by senders (stdout/stderr pumps, file reads).
CHUNK_SIZE: Final = 64 * 1024

_HEADER: Final = struct.Struct(">IB")
_LENGTH: Final = struct.Struct(">I")
_RESIZE: Final = struct.Struct(">HH")
_EXIT: Final = struct.Struct(">i")
HEADER_SIZE: Final = _HEADER.size


class FrameType(IntEnum):
    STDIN = 0x01
    STDOUT = 0x02
    STDERR = 0x03
    RESIZE = 0x04
    EXIT = 0x05
    ERROR = 0x06
    KILL = 0x07
    EXEC_REQ = 0x10
    AUTH = 0x11
    FWD_REQ = 0x20
    FWD_RESP = 0x21
    EXEC_LIST_REQ = 0x30
    EXEC_LIST_RESP = 0x31
    EXEC_KILL = 0x32
    SESSION_INFO = 0x33
    PROC_START = 0x34
    PROC_INFO = 0x35
    PROC_LIST_REQ = 0x36
    PROC_LIST_RESP = 0x37
    PROC_ATTACH = 0x38
    PROC_INPUT = 0x39
    PROC_SIGNAL = 0x3A
    PROC_STATUS = 0x3B
    PROC_RESIZE = 0x3C
    ACTIVITY_REQ = 0x40
    ACTIVITY_RESP = 0x41
    FILE_READ_REQ = 0x50
    FILE_READ_RESP = 0x51
    FILE_WRITE_REQ = 0x52
    FILE_WRITE_RESP = 0x53
    FILE_STAT_REQ = 0x54
    FILE_STAT_RESP = 0x55
    FILE_LS_REQ = 0x56
    FILE_LS_RESP = 0x57
    FILE_MKDIR_REQ = 0x58
    FILE_MKDIR_RESP = 0x59
    FILE_MOVE_REQ = 0x5A
    FILE_MOVE_RESP = 0x5B
    FILE_REMOVE_REQ = 0x5C
    FILE_REMOVE_RESP = 0x5D
    CLOCK_SET = 0x60
    CLOCK_SET_RESP = 0x61
    CONFIGURE = 0x62
    CONFIGURE_RESP = 0x63
    FILE_WATCH_REQ = 0x70
    FILE_WATCH_RESP = 0x71
    FILE_EVENT = 0x72


_KNOWN_TYPES: Final = frozenset(int(t) for t in FrameType)


def is_known_type(ftype: int) -> bool:
    """True for frame types this version understands; others are to be skipped."""
    return ftype in _KNOWN_TYPES


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``type`` stays a plain int so unknown types survive."""

    type: int
    payload: bytes = b""

    @property
    def known(self) -> bool:
        return self.type in _KNOWN_TYPES

    def __repr__(self) -> str:
        name = FrameType(self.type).name if self.known else f"0x{self.type:02x}"
        return f"Frame({name}, {len(self.payload)} bytes)"


def encode_frame(ftype: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """Encode one frame. Raises FrameTooLarge (and produces nothing) past MAX_FRAME."""
    length = len(payload) + 1
    if length > MAX_FRAME:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    if not 0 <= ftype <= 0xFF:
        raise ValueError(f"frame type {ftype} does not fit in one byte")
    return _HEADER.pack(length, ftype) + payload


class FrameDecoder:
    """Restartable decoder: ``feed()`` any slices of the stream, pull whole frames.

    The buffer only ever holds the bytes of one incomplete frame beyond what the
    caller fed in one go, and a length over ``max_frame`` is rejected as soon as
    its four bytes arrive, before any of the payload is buffered: a peer cannot
    make us hold more than one maximal frame.
    """

    __slots__ = ("_buf", "_max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Number of bytes held that do not yet form a whole frame (or not yet pulled)."""
        return len(self._buf)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        buf = self._buf
        have = len(buf)
        if have < 4:
            return None
        (length,) = _LENGTH.unpack_from(buf)
        if length == 0:
            raise MalformedFrame("frame length 0 (a frame always has a type byte)")
        if length > self._max_frame:
            raise FrameTooLarge(
                f"peer sent a frame of {length} bytes, over the {self._max_frame}-byte limit"
            )
        end = 4 + length
        if have < end:
            return None
        ftype = buf[4]
        # One copy for big payloads (memoryview), the cheaper slice for small ones.
        if length > 4096:
            with memoryview(buf) as view:
                payload = view[5:end].tobytes()
        else:
            payload = bytes(buf[5:end])
        # CPython deletes from the front of a bytearray in O(1) (it moves its start).
        del buf[:end]
        return Frame(ftype, payload)

    def frames(self) -> list[Frame]:
        """Every complete frame currently buffered."""
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    def take_remaining(self) -> bytes:
        """Hand over the unparsed bytes (for a connection that switches to raw relay)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def check_eof(self) -> None:
        """Call at end of stream: raises MalformedFrame if a partial frame is pending."""
        if self._buf:
            what = "header" if len(self._buf) < HEADER_SIZE else "payload"
            raise MalformedFrame(f"stream ended inside a frame {what} ({len(self._buf)} bytes)")


def encode_resize(rows: int, cols: int) -> bytes:
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ValueError(f"terminal size {rows}x{cols} outside 0..65535")
    return _RESIZE.pack(rows, cols)


def decode_resize(payload: bytes) -> tuple[int, int]:
    if len(payload) != _RESIZE.size:
        raise MalformedFrame(f"RESIZE payload must be 4 bytes, got {len(payload)}")
    rows, cols = _RESIZE.unpack(payload)
    return rows, cols


def encode_exit(code: int) -> bytes:
    if not -(1 << 31) <= code < (1 << 31):
        raise ValueError(f"exit code {code} does not fit in an i32")
    return _EXIT.pack(code)


def decode_exit(payload: bytes) -> int:
    if len(payload) != _EXIT.size:
        raise MalformedFrame(f"EXIT payload must be 4 bytes, got {len(payload)}")
    (code,) = _EXIT.unpack(payload)
    return int(code)
