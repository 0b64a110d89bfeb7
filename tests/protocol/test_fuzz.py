"""Property-based fuzzing of the wire protocol (hypothesis, derandomized and bounded).

Three promises of ``shared/reference/wire-protocol.md`` and :mod:`kiln.protocol`:

* whatever bytes a peer sends -- as frames, in any split, or as the payload of
  any frame type -- decoding raises nothing but :class:`ProtocolError`;
* a frame longer than the limit is refused from its header alone, before its
  payload is buffered, and the frames before it still come out intact;
* every message that decodes encodes back to the same message (round trip),
  whatever fields were missing, extra, mistyped or out of range.

``derandomize=True``: the same cases on every run (CI is reproducible); each
test's budget is its ``max_examples``, the whole module a few seconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.protocol import (
    HEADER_SIZE,
    MAX_FRAME,
    ActivityInfo,
    ClockSet,
    ExecKillRequest,
    ExecRequest,
    FileInfo,
    FileListing,
    FileReadRequest,
    FileReadResponse,
    FileWriteRequest,
    ForwardRequest,
    FrameDecoder,
    FrameTooLarge,
    InvalidMessage,
    PathRequest,
    ProcessAttach,
    ProcessInfo,
    ProcessInput,
    ProcessResize,
    ProcessSignal,
    ProcessStart,
    ProcessStatus,
    ProtocolError,
    SessionInfo,
    StatusResponse,
    decode_exit,
    decode_json,
    decode_resize,
    encode_frame,
    encode_json,
    process_list_from_payload,
    session_list_from_payload,
)

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)

#: A valid wire form of every JSON message: the starting point the fuzzer mutates.
SAMPLES: dict[type[Any], dict[str, Any]] = {
    ExecRequest: {
        "cmd": ["sh", "-c", "echo hi"],
        "env": {"A": "b"},
        "cwd": "/workspace",
        "tty": True,
        "rows": 24,
        "cols": 80,
        "session_id": "s1",
        "user": "root",
    },
    SessionInfo: {
        "session_id": "s1",
        "argv": "bash",
        "tty": True,
        "running": False,
        "attached": False,
        "created_at": 1.5,
        "exit_code": 0,
    },
    ActivityInfo: {"last_activity_unix": 1e9, "attached_sessions": 1, "running_sessions": 2},
    FileInfo: {"name": "a", "size": 3, "mode": "0644", "is_dir": False, "mtime": 2.0, "path": "/a"},
    FileReadRequest: {"path": "/a", "offset": 1, "limit": 2, "max_bytes": 3},
    FileReadResponse: {"size": 3, "mode": "0600"},
    FileWriteRequest: {"path": "/a", "size": 3, "mode": "0755"},
    PathRequest: {"path": "/a"},
    StatusResponse: {"status": "error", "message": "no"},
    ForwardRequest: {"port": 8080},
    ExecKillRequest: {"session_id": "s1"},
    ClockSet: {"unix_ns": 10**18, "seed": "00ff"},
    ProcessStart: {
        "cmd": ["sleep", "1"],
        "env": {"A": "b"},
        "cwd": "/",
        "user": "root",
        "stdin": False,
        "tag": "t",
        "tty": True,
        "rows": 24,
        "cols": 80,
    },
    ProcessInfo: {
        "pid": 7,
        "cmd": ["sleep", "1"],
        "running": False,
        "started_at": 1.0,
        "exit_code": 0,
        "finished_at": 2.0,
        "tty": False,
        "session_id": None,
        "user": "sandbox",
        "tag": "t",
        "cwd": "/",
        "env": {"A": "b"},
    },
    ProcessAttach: {"pid": 7, "replay": True, "follow": False},
    ProcessInput: {"pid": 7, "size": 5, "close": True},
    ProcessSignal: {"pid": 7, "signal": "TERM"},
    ProcessResize: {"pid": 7, "rows": 24, "cols": 80},
    ProcessStatus: {"status": "error", "reason": "not_found", "message": "gone", "exit_code": 1},
}

#: Values at the edges of what the fields accept: out of range, huge (an integer
#: no float can hold), whole floats, negative zero, empty, NUL -- JSON itself has
#: no NaN or Infinity.
EDGES = [0, -1, 1, 65535, 65536, 2**31, 2**63, -(2**63), 10**400, -(10**400), 16 << 20]
EDGES += [0.5, -0.0, 3.0, 1e308, -1e308, "", "\x00", "/", "0644", "0o644", "7777", "SIGKILL"]
EDGES += ["ok", "error", "not_found", "zz", "ff" * 5000, True, False, None, [], {}]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
field_values = st.one_of(st.sampled_from(EDGES), json_values)


@st.composite
def mutated(draw: st.DrawFn, sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with fields dropped, replaced by any JSON value, and added."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        what = draw(st.sampled_from(["keep", "keep", "drop", "replace"]))
        if what == "keep":
            out[key] = value
        elif what == "replace":
            out[key] = draw(field_values)
    out.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return out


def _parse_or_refuse(parse: Callable[[], Any]) -> Any:
    """Run a decoder: its result, or None if it refused with the protocol's error."""
    try:
        return parse()
    except ProtocolError:
        return None


# -- messages ---------------------------------------------------------------------------


MESSAGES = sorted(SAMPLES, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_a_message_that_decodes_round_trips(cls: type[Any], data: st.DataObject) -> None:
    doc = data.draw(mutated(SAMPLES[cls]), label="json")
    message = _parse_or_refuse(lambda: cls.from_json(doc))
    if message is None:
        return
    payload = message.to_payload()
    assert len(payload) < MAX_FRAME
    assert cls.from_payload(payload) == message
    assert cls.from_payload(payload).to_payload() == payload


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
def test_every_edge_value_in_every_field(cls: type[Any]) -> None:
    """Systematic where chance is thin: each edge value in each field, alone."""
    for key in SAMPLES[cls]:
        for value in EDGES:
            doc = {**SAMPLES[cls], key: value}
            message = _parse_or_refuse(lambda doc=doc: cls.from_json(doc))
            if message is not None:
                assert cls.from_payload(message.to_payload()) == message, doc


@settings(FUZZ, max_examples=100)
@given(cls=st.sampled_from(MESSAGES), value=field_values)
def test_any_json_value_decodes_or_is_refused_cleanly(cls: type[Any], value: Any) -> None:
    message = _parse_or_refuse(lambda: cls.from_json(value))
    if message is not None:
        assert cls.from_payload(message.to_payload()) == message


LIST_DECODERS: list[Callable[[bytes], Any]] = [
    session_list_from_payload,
    process_list_from_payload,
    FileListing.from_payload,
]


@FUZZ
@given(
    decode=st.sampled_from(LIST_DECODERS),
    items=st.lists(
        st.sampled_from([SessionInfo, ProcessInfo, FileInfo]).flatmap(lambda c: mutated(SAMPLES[c]))
        | json_values,
        max_size=4,
    ),
)
def test_lists_of_messages_decode_or_are_refused_cleanly(
    decode: Callable[[bytes], Any], items: list[Any]
) -> None:
    _parse_or_refuse(lambda: decode(encode_json(items)))


#: Every decoder of a frame payload a peer controls.
PAYLOAD_DECODERS: list[Callable[[bytes], Any]] = [
    *(cls.from_payload for cls in MESSAGES),
    *LIST_DECODERS,
    decode_json,
    decode_resize,
    decode_exit,
]


@FUZZ
@given(decode=st.sampled_from(PAYLOAD_DECODERS), payload=st.binary(max_size=64))
def test_arbitrary_payload_bytes_raise_only_protocol_errors(
    decode: Callable[[bytes], Any], payload: bytes
) -> None:
    _parse_or_refuse(lambda: decode(payload))


@settings(FUZZ, max_examples=100)
@given(decode=st.sampled_from(PAYLOAD_DECODERS), text=st.text(max_size=64))
def test_arbitrary_text_payloads_raise_only_protocol_errors(
    decode: Callable[[bytes], Any], text: str
) -> None:
    _parse_or_refuse(lambda: decode(text.encode()))


def test_deeply_nested_json_is_refused_cleanly() -> None:
    for payload in (b"[" * 200_000, b'{"a":' * 200_000):
        with pytest.raises(InvalidMessage):
            decode_json(payload)


# -- frames ------------------------------------------------------------------------------


@FUZZ
@given(stream=st.binary(max_size=256), cuts=st.lists(st.integers(0, 256), max_size=6))
def test_arbitrary_bytes_in_any_split_raise_only_protocol_errors(
    stream: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder(max_frame=64)
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    try:
        for start, end in itertools.pairwise(bounds):
            decoder.feed(stream[start:end])
            for frame in decoder.frames():
                assert 1 + len(frame.payload) <= 64
        decoder.check_eof()
    except ProtocolError:
        pass


frames = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), min_size=0, max_size=5)


@FUZZ
@given(
    before=frames,
    length=st.one_of(st.integers(65, 2**32 - 1), st.sampled_from([65, MAX_FRAME + 1, 2**32 - 1])),
    tail=st.binary(max_size=64),
)
def test_an_oversized_frame_is_refused_from_its_header(
    before: list[tuple[int, bytes]], length: int, tail: bytes
) -> None:
    decoder = FrameDecoder(max_frame=64)
    good = b"".join(encode_frame(t, p) for t, p in before)
    decoder.feed(good + length.to_bytes(4, "big") + tail)
    decoded = []
    with pytest.raises(FrameTooLarge):
        while (frame := decoder.next_frame()) is not None:
            decoded.append((frame.type, frame.payload))
    assert decoded == before  # the frames before it came out intact
    # Nothing of the oversized frame was taken in beyond what was fed with its header.
    assert decoder.buffered == 4 + len(tail)


@settings(FUZZ, max_examples=50)
@given(extra=st.integers(1, 1 << 16))
def test_the_encoder_refuses_what_the_decoder_would(extra: int) -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(0x02, bytes(MAX_FRAME - 1 + extra))
    header = (MAX_FRAME + extra).to_bytes(4, "big") + b"\x02"
    decoder = FrameDecoder()
    decoder.feed(header)
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    assert decoder.buffered == HEADER_SIZE


@FUZZ
@given(sent=frames, cuts=st.lists(st.integers(0, 300), max_size=8))
def test_frames_round_trip_in_any_split(sent: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(t, p) for t, p in sent)
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    decoder = FrameDecoder()
    got = []
    for start, end in itertools.pairwise(bounds):
        decoder.feed(stream[start:end])
        got += [(f.type, f.payload) for f in decoder.frames()]
    decoder.check_eof()
    assert got == sent
