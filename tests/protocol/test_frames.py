"""The sans-IO frame codec: round trips, EOF, limits, partial input, unknown types."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.protocol import (
    HEADER_SIZE,
    MAX_FRAME,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    FrameType,
    MalformedFrame,
    ProtocolError,
    decode_exit,
    decode_resize,
    encode_exit,
    encode_frame,
    encode_resize,
    is_known_type,
)


def decode_all(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.feed(data)
    frames = decoder.frames()
    decoder.check_eof()
    return frames


# -- round trip ----------------------------------------------------------------


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
@pytest.mark.parametrize(
    "payload",
    [b"", b"x", bytes(range(256)), b"\x00" * 1000, b"\xff\xfe\x00\x01" * 16384],
    ids=["empty", "one", "all-bytes", "zeros", "64k-binary"],
)
def test_round_trip_every_type(ftype: FrameType, payload: bytes) -> None:
    wire = encode_frame(ftype, payload)
    assert len(wire) == HEADER_SIZE + len(payload)
    assert wire[:4] == struct.pack(">I", len(payload) + 1)
    assert wire[4] == ftype
    [frame] = decode_all(wire)
    assert frame == Frame(int(ftype), payload)
    assert frame.known
    assert type(frame.payload) is bytes


def test_wire_layout_matches_spec() -> None:
    # Independent encoding of the contract: u32 BE length (type + payload), u8 type.
    assert encode_frame(FrameType.STDOUT, b"hi") == b"\x00\x00\x00\x03\x02hi"
    assert encode_frame(FrameType.KILL) == b"\x00\x00\x00\x01\x07"
    assert encode_frame(FrameType.CLOCK_SET_RESP, b"{}") == b"\x00\x00\x00\x03\x61{}"


def test_encode_accepts_buffer_types() -> None:
    expected = encode_frame(FrameType.STDIN, b"abc")
    assert encode_frame(FrameType.STDIN, bytearray(b"abc")) == expected
    assert encode_frame(FrameType.STDIN, memoryview(b"xabcx")[1:4]) == expected


def test_encode_rejects_type_outside_a_byte() -> None:
    with pytest.raises(ValueError):
        encode_frame(256, b"")
    with pytest.raises(ValueError):
        encode_frame(-1, b"")


def test_frame_type_values_match_spec() -> None:
    spec = {
        "STDIN": 0x01, "STDOUT": 0x02, "STDERR": 0x03, "RESIZE": 0x04, "EXIT": 0x05,
        "ERROR": 0x06, "KILL": 0x07, "EXEC_REQ": 0x10, "AUTH": 0x11, "FWD_REQ": 0x20,
        "FWD_RESP": 0x21, "EXEC_LIST_REQ": 0x30, "EXEC_LIST_RESP": 0x31, "EXEC_KILL": 0x32,
        "SESSION_INFO": 0x33, "ACTIVITY_REQ": 0x40, "ACTIVITY_RESP": 0x41,
        "FILE_READ_REQ": 0x50, "FILE_READ_RESP": 0x51, "FILE_WRITE_REQ": 0x52,
        "FILE_WRITE_RESP": 0x53, "FILE_STAT_REQ": 0x54, "FILE_STAT_RESP": 0x55,
        "FILE_LS_REQ": 0x56, "FILE_LS_RESP": 0x57, "CLOCK_SET": 0x60, "CLOCK_SET_RESP": 0x61,
    }  # fmt: skip
    # kiln's extension (kiln.protocol.processes): the process table.
    processes = {
        "PROC_START": 0x34, "PROC_INFO": 0x35, "PROC_LIST_REQ": 0x36, "PROC_LIST_RESP": 0x37,
        "PROC_ATTACH": 0x38, "PROC_INPUT": 0x39, "PROC_SIGNAL": 0x3A, "PROC_STATUS": 0x3B,
        "PROC_RESIZE": 0x3C,
    }  # fmt: skip
    # kiln's extension (kiln.protocol.fsops): mkdir, move, remove, watch.
    fsops = {
        "FILE_MKDIR_REQ": 0x58, "FILE_MKDIR_RESP": 0x59, "FILE_MOVE_REQ": 0x5A,
        "FILE_MOVE_RESP": 0x5B, "FILE_REMOVE_REQ": 0x5C, "FILE_REMOVE_RESP": 0x5D,
        "FILE_WATCH_REQ": 0x70, "FILE_WATCH_RESP": 0x71, "FILE_EVENT": 0x72,
    }  # fmt: skip
    # kiln's extension: a running agent configured (the warm pool's claim).
    configure = {"CONFIGURE": 0x62, "CONFIGURE_RESP": 0x63}
    assert {t.name: t.value for t in FrameType} == spec | processes | fsops | configure


# -- EOF -------------------------------------------------------------------------


def test_empty_stream_is_a_clean_eof() -> None:
    decoder = FrameDecoder()
    assert decoder.next_frame() is None
    decoder.check_eof()  # no error: nothing pending
    assert decoder.buffered == 0


def test_eof_after_whole_frames_is_clean() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(FrameType.STDOUT, b"a") + encode_frame(FrameType.EXIT, b"\0\0\0\0"))
    assert len(decoder.frames()) == 2
    decoder.check_eof()


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_partial_header_at_eof_is_malformed(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(FrameType.STDOUT, b"hello")[:cut])
    assert decoder.next_frame() is None
    with pytest.raises(MalformedFrame, match="header"):
        decoder.check_eof()


@pytest.mark.parametrize("cut", [5, 6, 9])
def test_partial_payload_at_eof_is_malformed(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(FrameType.STDOUT, b"hello")[:cut])
    assert decoder.next_frame() is None
    with pytest.raises(MalformedFrame, match="payload"):
        decoder.check_eof()


def test_partial_frame_after_a_whole_one_is_malformed_at_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(
        encode_frame(FrameType.STDOUT, b"one") + encode_frame(FrameType.STDOUT, b"two")[:6]
    )
    assert decoder.next_frame() == Frame(FrameType.STDOUT, b"one")
    assert decoder.next_frame() is None
    with pytest.raises(MalformedFrame):
        decoder.check_eof()


# -- maximum frame size ------------------------------------------------------------


def test_encode_exactly_max_frame_is_accepted() -> None:
    payload = b"\xab" * MAX_PAYLOAD
    wire = encode_frame(FrameType.STDOUT, payload)
    assert struct.unpack(">I", wire[:4])[0] == MAX_FRAME
    [frame] = decode_all(wire)
    assert frame.payload == payload


def test_encode_one_mib_payload_is_refused() -> None:
    # 1 MiB of payload + the type byte is one byte over the limit.
    with pytest.raises(FrameTooLarge):
        encode_frame(FrameType.STDOUT, b"x" * (1 << 20))
    assert issubclass(FrameTooLarge, ProtocolError)


def test_decoder_refuses_oversized_length_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    header = struct.pack(">I", MAX_FRAME + 1)
    decoder.feed(header[:3])
    assert decoder.next_frame() is None  # not yet known
    decoder.feed(header[3:])
    # Refused as soon as the 4 length bytes are in, before any payload is buffered.
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_decoder_refuses_max_u32_length() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff\xff\x02")
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_decoder_accepts_length_exactly_max() -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">IB", MAX_FRAME, FrameType.STDOUT))
    assert decoder.next_frame() is None  # waits for the payload, no error
    decoder.feed(b"z" * MAX_PAYLOAD)
    frame = decoder.next_frame()
    assert frame is not None
    assert len(frame.payload) == MAX_PAYLOAD


def test_decoder_custom_limit() -> None:
    decoder = FrameDecoder(max_frame=16)
    decoder.feed(encode_frame(FrameType.STDOUT, b"x" * 15))
    assert decoder.next_frame() is not None
    decoder.feed(encode_frame(FrameType.STDOUT, b"x" * 16))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_length_zero_is_malformed() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(MalformedFrame, match="length 0"):
        decoder.next_frame()


def test_length_zero_after_valid_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(FrameType.STDOUT, b"ok") + b"\x00\x00\x00\x00\x02")
    assert decoder.next_frame() == Frame(FrameType.STDOUT, b"ok")
    with pytest.raises(MalformedFrame):
        decoder.next_frame()


# -- partial buffers -------------------------------------------------------------------

SAMPLE = [
    (FrameType.AUTH, b"0123456789abcdef0123456789abcdef"),
    (FrameType.EXEC_REQ, b'{"cmd":["true"]}'),
    (FrameType.STDIN, b""),
    (FrameType.STDOUT, bytes(range(256)) * 3),
    (0x99, b"unknown"),
    (FrameType.KILL, b""),
    (FrameType.EXIT, encode_exit(-9)),
]
SAMPLE_WIRE = b"".join(encode_frame(t, p) for t, p in SAMPLE)
SAMPLE_FRAMES = [Frame(int(t), p) for t, p in SAMPLE]


def test_byte_by_byte_feed() -> None:
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(SAMPLE_WIRE)):
        decoder.feed(SAMPLE_WIRE[i : i + 1])
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    decoder.check_eof()
    assert out == SAMPLE_FRAMES
    assert decoder.buffered == 0


def test_every_single_split_point() -> None:
    for cut in range(len(SAMPLE_WIRE) + 1):
        decoder = FrameDecoder()
        out: list[Frame] = []
        for part in (SAMPLE_WIRE[:cut], SAMPLE_WIRE[cut:]):
            decoder.feed(part)
            out.extend(decoder.frames())
        decoder.check_eof()
        assert out == SAMPLE_FRAMES, f"split at {cut}"


def test_incomplete_frame_is_not_consumed() -> None:
    decoder = FrameDecoder()
    wire = encode_frame(FrameType.STDOUT, b"abcdef")
    decoder.feed(wire[:7])
    assert decoder.next_frame() is None
    assert decoder.next_frame() is None  # polling again changes nothing
    assert decoder.buffered == 7
    decoder.feed(wire[7:])
    assert decoder.next_frame() == Frame(FrameType.STDOUT, b"abcdef")
    assert decoder.next_frame() is None


frame_strategy = st.tuples(st.integers(0, 255), st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(frame_strategy, max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_arbitrary_splits_yield_the_same_frames(
    frames: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(t, p) for t, p in frames)
    points = sorted({c % (len(wire) + 1) for c in cuts}) if wire else []
    decoder = FrameDecoder()
    out: list[Frame] = []
    start = 0
    for point in [*points, len(wire)]:
        decoder.feed(wire[start:point])
        start = point
        out.extend(decoder.frames())
    decoder.check_eof()
    assert out == [Frame(t, p) for t, p in frames]


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(frame_strategy, min_size=1, max_size=6), data=st.data())
def test_truncated_stream_never_yields_a_wrong_frame(
    frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    wire = b"".join(encode_frame(t, p) for t, p in frames)
    cut = data.draw(st.integers(0, len(wire) - 1))
    decoder = FrameDecoder()
    decoder.feed(wire[:cut])
    got = decoder.frames()
    # Only whole frames come out, and they are a prefix of what was sent.
    assert got == [Frame(t, p) for t, p in frames][: len(got)]
    ends = set()
    pos = 0
    for _, p in frames:
        pos += HEADER_SIZE + len(p)
        ends.add(pos)
    if cut in ends or cut == 0:
        decoder.check_eof()
    else:
        with pytest.raises(MalformedFrame):
            decoder.check_eof()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_raises_only_protocol_errors(garbage: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(garbage)
    try:
        decoder.frames()
        decoder.check_eof()
    except ProtocolError:
        pass


def test_take_remaining_hands_over_unparsed_bytes() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(FrameType.FWD_RESP, b'{"status":"ok"}') + b"SSH-2.0-raw bytes")
    frame = decoder.next_frame()
    assert frame is not None
    assert frame.type == FrameType.FWD_RESP
    assert decoder.take_remaining() == b"SSH-2.0-raw bytes"
    assert decoder.buffered == 0
    decoder.check_eof()


def test_large_multi_frame_buffer() -> None:
    payloads = [bytes([i % 256]) * (i * 997 % 70000) for i in range(60)]
    wire = b"".join(encode_frame(FrameType.STDOUT, p) for p in payloads)
    assert [f.payload for f in decode_all(wire)] == payloads


# -- unknown types ---------------------------------------------------------------------


@pytest.mark.parametrize("ftype", [0x00, 0x08, 0x0F, 0x22, 0x64, 0x7F, 0x80, 0xFF])
def test_unknown_types_survive_decoding(ftype: int) -> None:
    assert not is_known_type(ftype)
    wire = encode_frame(ftype, b"future") + encode_frame(FrameType.STDOUT, b"after")
    first, second = decode_all(wire)
    assert first.type == ftype
    assert first.payload == b"future"
    assert not first.known
    assert second.known
    assert f"0x{ftype:02x}" in repr(first)


def test_known_types_are_known() -> None:
    for ftype in FrameType:
        assert is_known_type(ftype)
        assert Frame(ftype).known
        assert ftype.name in repr(Frame(int(ftype), b"ab"))


# -- RESIZE and EXIT payloads -----------------------------------------------------------


@pytest.mark.parametrize(("rows", "cols"), [(0, 0), (24, 80), (65535, 65535), (1, 65535)])
def test_resize_round_trip(rows: int, cols: int) -> None:
    payload = encode_resize(rows, cols)
    assert payload == struct.pack(">HH", rows, cols)
    assert decode_resize(payload) == (rows, cols)


@pytest.mark.parametrize(("rows", "cols"), [(-1, 80), (24, -1), (65536, 80), (24, 65536)])
def test_resize_out_of_range(rows: int, cols: int) -> None:
    with pytest.raises(ValueError):
        encode_resize(rows, cols)


@pytest.mark.parametrize("size", [0, 1, 3, 5, 8])
def test_resize_wrong_payload_size(size: int) -> None:
    with pytest.raises(MalformedFrame):
        decode_resize(b"\x00" * size)


@pytest.mark.parametrize("code", [0, 1, 2, 126, 127, 137, 255, 256, -1, -9, 2**31 - 1, -(2**31)])
def test_exit_round_trip(code: int) -> None:
    payload = encode_exit(code)
    assert payload == struct.pack(">i", code)
    assert decode_exit(payload) == code


def test_exit_is_signed_big_endian() -> None:
    assert decode_exit(b"\xff\xff\xff\xff") == -1
    assert decode_exit(b"\x00\x00\x00\x89") == 137
    assert decode_exit(b"\x80\x00\x00\x00") == -(2**31)


@pytest.mark.parametrize("code", [2**31, -(2**31) - 1, 2**40])
def test_exit_out_of_i32(code: int) -> None:
    with pytest.raises(ValueError):
        encode_exit(code)


@pytest.mark.parametrize("size", [0, 1, 3, 5, 8])
def test_exit_wrong_payload_size(size: int) -> None:
    with pytest.raises(MalformedFrame):
        decode_exit(b"\x00" * size)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**31), 2**31 - 1))
def test_exit_property(code: int) -> None:
    assert decode_exit(encode_exit(code)) == code


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 65535), st.integers(0, 65535))
def test_resize_property(rows: int, cols: int) -> None:
    assert decode_resize(encode_resize(rows, cols)) == (rows, cols)
