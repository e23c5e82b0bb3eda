"""Length-prefixed msgpack frames of the control channel (p2pd/protocol/framing.py)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol.framing import MAX_FRAME, FrameError, FrameReader, encode_frame
from tests.unit._util import FAST, QUICK, cut_lists, split

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
msgpack_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=10,
)


@QUICK
@given(st.lists(msgpack_values, max_size=6), cut_lists)
def test_round_trip_with_arbitrary_splits(objs: list[Any], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(o) for o in objs)
    reader = FrameReader()
    got: list[Any] = []
    for chunk in split(stream, cuts):
        got += reader.feed(chunk)
    assert got == objs


@QUICK
@given(st.lists(msgpack_values, min_size=1, max_size=3))
def test_byte_at_a_time(objs: list[Any]) -> None:
    stream = b"".join(encode_frame(o) for o in objs)
    reader = FrameReader()
    got: list[Any] = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == objs


def test_frame_layout() -> None:
    frame = encode_frame({"a": 1})
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert frame[4:] == b"\x81\xa1a\x01"


def test_partial_frame_yields_nothing_until_complete() -> None:
    frame = encode_frame({"id": 7, "method": "status"})
    reader = FrameReader()
    assert reader.feed(frame[:3]) == []
    assert reader.feed(frame[3:-1]) == []
    assert reader.feed(frame[-1:]) == [{"id": 7, "method": "status"}]
    assert reader.feed(b"") == []


def test_empty_feed() -> None:
    assert FrameReader().feed(b"") == []


def test_oversize_length_refused_before_body_arrives() -> None:
    reader = FrameReader()
    with pytest.raises(FrameError, match="exceeds"):
        reader.feed(struct.pack(">I", MAX_FRAME + 1))


def test_custom_limit() -> None:
    reader = FrameReader(max_frame=10)
    assert reader.feed(encode_frame("x" * 5)) == ["x" * 5]
    with pytest.raises(FrameError, match="10-byte limit"):
        reader.feed(encode_frame("x" * 20))


def test_frame_at_exactly_the_limit_is_accepted() -> None:
    body = b"\xc0"  # msgpack nil
    reader = FrameReader(max_frame=1)
    assert reader.feed(struct.pack(">I", 1) + body) == [None]


def test_encode_refuses_oversized_frame() -> None:
    with pytest.raises(FrameError, match="exceeds"):
        encode_frame(b"\0" * (MAX_FRAME + 1))


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # array of 2 with only one element
        b"\xa5abc",  # str of 5 with 3 bytes
        b"\x01\x02",  # trailing bytes after a complete object
        b"",  # empty body
        b"\xa1\x80",  # a str that is not UTF-8
        b"\x81\xa1\xff\x01",  # a map key that is not UTF-8
        b"\x81\xa2id\xa2\xc3\x28",  # a value that is not UTF-8
        b"\x91" * 200_000 + b"\xc0",  # nested deeper than the decoder's recursion limit
    ],
)
def test_garbage_body_raises_frame_error(body: bytes) -> None:
    with pytest.raises(FrameError, match="undecodable"):
        FrameReader().feed(struct.pack(">I", len(body)) + body)


@FAST
@given(st.binary(min_size=1, max_size=200))
def test_random_bytes_never_raise_anything_but_frame_error(data: bytes) -> None:
    reader = FrameReader(max_frame=1 << 16)
    try:
        reader.feed(data)
    except FrameError:
        pass


@QUICK
@given(
    st.lists(msgpack_values, min_size=1, max_size=3), st.integers(min_value=0), st.integers(min_value=1, max_value=255)
)
def test_corrupted_byte_raises_only_frame_error(objs: list[Any], pos: int, xor: int) -> None:
    stream = bytearray(b"".join(encode_frame(o) for o in objs))
    stream[4 + pos % (len(stream) - 4)] ^= xor  # corrupt a body byte (lengths are covered above)
    try:
        FrameReader().feed(bytes(stream))
    except FrameError:
        pass


def test_frames_after_an_error_are_not_required_to_decode() -> None:
    # A good frame followed by garbage in the same chunk: the garbage raises (the connection is closed).
    reader = FrameReader()
    with pytest.raises(FrameError):
        reader.feed(encode_frame(1) + struct.pack(">I", 1) + b"\xc1")
