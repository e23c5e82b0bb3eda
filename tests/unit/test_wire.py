"""Peer wire protocol codec (p2pd/protocol/wire.py): round-trips and malformed frames."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol import wire
from p2pd.protocol.wire import (
    CODEC_RAW,
    CODEC_ZSTD,
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_FRAME,
    PIECE_SUB_SIZE,
    Auth,
    Bitfield,
    Cancel,
    Defer,
    FrameDecoder,
    Goodbye,
    Handshake,
    Have,
    KeepAlive,
    MsgType,
    PieceHeader,
    ProtocolError,
    Reject,
    Request,
)
from tests.unit._util import FAST, cut_lists, split

MAX_PIECE = 4096
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)


def _short_text(max_bytes: int) -> st.SearchStrategy[str]:
    return st.text(max_size=max_bytes // 4)


handshakes = st.builds(
    Handshake,
    version=st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    node_id=st.text(max_size=40),
    artifact_id=st.text(max_size=70),
    key=st.binary(max_size=40),
    nonce=st.binary(max_size=20),
)
messages = st.one_of(
    handshakes,
    st.builds(Auth, st.binary(max_size=80), st.binary(max_size=40)),
    st.builds(Bitfield, st.binary(max_size=300)),
    st.builds(Have, u32),
    st.builds(Request, u32),
    st.builds(Cancel, u32),
    st.builds(Reject, u32),
    st.builds(Defer, u32),
    st.builds(wire.BadPiece, u32),
    st.builds(Goodbye, _short_text(1024)),
    st.just(KeepAlive()),
)
pieces = st.tuples(u32, st.sampled_from([CODEC_RAW, CODEC_ZSTD]), st.binary(max_size=300))  # MAX_PIECE: below
items = st.lists(st.one_of(messages, pieces), max_size=10)


def _encode_item(item: wire.Message | tuple[int, int, bytes]) -> bytes:
    if isinstance(item, tuple):
        index, codec, data = item
        return wire.encode_piece_header(index, codec, len(data)) + data
    return wire.encode(item)


def _expected(item: wire.Message | tuple[int, int, bytes]) -> object:
    if isinstance(item, tuple):
        index, codec, data = item
        return (PieceHeader(index, codec, len(data)), data)
    return item


def _decode_all(stream: bytes, cuts: list[int], max_piece: int = MAX_PIECE) -> list[object]:
    dec = FrameDecoder(max_piece)
    out: list[object] = []
    for chunk in split(stream, cuts):
        out += dec.feed(chunk)
    return out


# ------------------------------------------------------------------------------------------ round trips
@FAST
@given(items, cut_lists)
def test_every_message_round_trips_with_arbitrary_chunking(msgs: list, cuts: list[int]) -> None:
    stream = b"".join(_encode_item(m) for m in msgs)
    assert _decode_all(stream, cuts) == [_expected(m) for m in msgs]


@FAST
@given(messages)
def test_single_message_byte_by_byte(msg: wire.Message) -> None:
    frame = wire.encode(msg)
    dec = FrameDecoder(MAX_PIECE)
    out: list[object] = []
    for i in range(len(frame)):
        got = dec.feed(frame[i : i + 1])
        if i < len(frame) - 1:
            assert got == []
        out += got
    assert out == [msg]


@FAST
@given(messages)
def test_header_and_decode_body_agree_with_encode(msg: wire.Message) -> None:
    frame = wire.encode(msg)
    t, n = wire.parse_header(frame[:HEADER_SIZE], MAX_PIECE)
    assert n == len(frame) - HEADER_SIZE
    assert wire.decode_body(t, frame[HEADER_SIZE:]) == msg


@FAST
@given(u32, st.sampled_from([CODEC_RAW, CODEC_ZSTD]), st.integers(min_value=0, max_value=MAX_PIECE))
def test_piece_header_as_the_daemon_reads_it(index: int, codec: int, n: int) -> None:
    hdr = wire.encode_piece_header(index, codec, n)
    assert len(hdr) == HEADER_SIZE + PIECE_SUB_SIZE
    t, body = wire.parse_header(hdr[:HEADER_SIZE], MAX_PIECE)
    assert t is MsgType.PIECE and body == PIECE_SUB_SIZE + n
    assert wire.parse_piece_sub(hdr[HEADER_SIZE:], body) == PieceHeader(index, codec, n)


def test_fixed_layouts() -> None:
    assert wire.encode(Have(0x01020304)) == b"\x00\x00\x00\x05\x03\x01\x02\x03\x04"
    assert wire.encode(Request(7)) == b"\x00\x00\x00\x05\x04\x00\x00\x00\x07"
    assert wire.encode(Defer(7)) == b"\x00\x00\x00\x05\x0a\x00\x00\x00\x07"
    assert wire.encode(KeepAlive()) == b"\x00\x00\x00\x01\x09"
    assert wire.encode(Bitfield(b"\x80")) == b"\x00\x00\x00\x02\x02\x80"
    assert wire.encode_piece_header(1, CODEC_RAW, 3) == b"\x00\x00\x00\x09\x05\x00\x00\x00\x01\x00"


def test_goodbye_reason_is_truncated_to_1024_bytes() -> None:
    frame = wire.encode(Goodbye("x" * 5000))
    (msg,) = FrameDecoder(MAX_PIECE).feed(frame)
    assert msg == Goodbye("x" * 1024)


def test_goodbye_truncated_inside_a_multibyte_char_still_decodes() -> None:
    frame = wire.encode(Goodbye("a" + "é" * 1000))  # byte 1024 falls inside a 2-byte character
    (msg,) = FrameDecoder(MAX_PIECE).feed(frame)
    assert isinstance(msg, Goodbye) and msg.reason.startswith("aéé")


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        wire.encode("hello")  # type: ignore[arg-type]


def test_zero_length_piece_and_max_piece() -> None:
    stream = wire.encode_piece_header(3, CODEC_RAW, 0) + wire.encode_piece_header(4, CODEC_RAW, MAX_PIECE)
    stream += b"z" * MAX_PIECE
    assert FrameDecoder(MAX_PIECE).feed(stream) == [
        (PieceHeader(3, CODEC_RAW, 0), b""),
        (PieceHeader(4, CODEC_RAW, MAX_PIECE), b"z" * MAX_PIECE),
    ]


def test_partial_frame_is_kept_until_complete() -> None:
    dec = FrameDecoder(MAX_PIECE)
    frame = wire.encode(Have(9))
    assert dec.feed(frame[:HEADER_SIZE]) == []
    assert dec.feed(frame[HEADER_SIZE:] + frame[:2]) == [Have(9)]
    assert dec.feed(frame[2:]) == [Have(9)]


# ------------------------------------------------------------------------------------------ malformed
UNKNOWN_TYPES = [0, max(MsgType) + 1, 200, 255]
INDEX_TYPES = [MsgType.HAVE, MsgType.REQUEST, MsgType.CANCEL, MsgType.REJECT, MsgType.DEFER, MsgType.BAD_PIECE]


def test_message_type_numbers_are_stable() -> None:
    # These numbers are the protocol: changing one breaks every deployed node.
    assert {m.name: m.value for m in MsgType} == {
        "HANDSHAKE": 1,
        "BITFIELD": 2,
        "HAVE": 3,
        "REQUEST": 4,
        "PIECE": 5,
        "CANCEL": 6,
        "REJECT": 7,
        "GOODBYE": 8,
        "KEEPALIVE": 9,
        "DEFER": 10,
        "BAD_PIECE": 11,
        "AUTH": 12,
    }


@pytest.mark.parametrize("t", UNKNOWN_TYPES)
def test_unknown_type(t: int) -> None:
    with pytest.raises(ProtocolError, match=f"unknown message type {t}"):
        FrameDecoder(MAX_PIECE).feed(HEADER.pack(1, t))


@pytest.mark.parametrize("t", list(MsgType))
def test_zero_length(t: MsgType) -> None:
    with pytest.raises(ProtocolError, match="frame length 0"):
        FrameDecoder(MAX_PIECE).feed(HEADER.pack(0, t))


@pytest.mark.parametrize("t", [m for m in MsgType if m is not MsgType.PIECE])
def test_oversized_control_frame(t: MsgType) -> None:
    # Refused from the header alone: nothing of the body needs to arrive.
    with pytest.raises(ProtocolError, match="exceeds limit"):
        FrameDecoder(MAX_PIECE).feed(HEADER.pack(MAX_CONTROL_FRAME + 2, t))
    assert wire.parse_header(HEADER.pack(MAX_CONTROL_FRAME + 1, t), MAX_PIECE) == (t, MAX_CONTROL_FRAME)


def test_huge_length_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds limit"):
        wire.parse_header(HEADER.pack(0xFFFFFFFF, MsgType.HAVE), MAX_PIECE)


def test_oversized_piece_frame() -> None:
    ok = wire.encode_piece_header(0, CODEC_RAW, MAX_PIECE)
    assert wire.parse_header(ok, MAX_PIECE) == (MsgType.PIECE, PIECE_SUB_SIZE + MAX_PIECE)
    bad = wire.encode_piece_header(0, CODEC_RAW, MAX_PIECE + 1)
    with pytest.raises(ProtocolError, match="PIECE frame of"):
        wire.parse_header(bad, MAX_PIECE)
    with pytest.raises(ProtocolError):
        FrameDecoder(MAX_PIECE).feed(bad)
    # The piece limit is per decoder: a larger max_piece accepts the same frame.
    assert wire.parse_header(bad, MAX_PIECE + 1)[0] is MsgType.PIECE


@pytest.mark.parametrize("t", INDEX_TYPES)
@pytest.mark.parametrize("size", [0, 1, 3, 5, 8])
def test_fixed_size_body_of_wrong_length(t: MsgType, size: int) -> None:
    with pytest.raises(ProtocolError, match="must be 4 bytes"):
        FrameDecoder(MAX_PIECE).feed(HEADER.pack(size + 1, t) + b"\x01" * size)


@pytest.mark.parametrize("size", [0, 1, 4])
def test_piece_frame_shorter_than_its_sub_header(size: int) -> None:
    with pytest.raises(ProtocolError, match="too short"):
        FrameDecoder(MAX_PIECE).feed(HEADER.pack(size + 1, MsgType.PIECE) + b"\0" * size)


@pytest.mark.parametrize("codec", [2, 3, 255])
def test_bad_codec(codec: int) -> None:
    frame = HEADER.pack(1 + PIECE_SUB_SIZE + 2, MsgType.PIECE) + wire.PIECE_SUB.pack(0, codec) + b"ab"
    with pytest.raises(ProtocolError, match=f"unknown piece codec {codec}"):
        FrameDecoder(MAX_PIECE).feed(frame)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # invalid msgpack
        b"\x01",  # an int, not a map
        msgspec.msgpack.encode({"version": 1, "node_id": "n"}),  # missing artifact_id
        msgspec.msgpack.encode({"version": "1", "node_id": "n", "artifact_id": "a"}),  # wrong type
        msgspec.msgpack.encode({"version": 1, "node_id": 5, "artifact_id": "a"}),
        msgspec.msgpack.encode({"version": 1, "node_id": "n", "artifact_id": "a"}) + b"\x00",  # trailing
        b"\xcf",  # truncated uint64
        msgspec.msgpack.encode({"version": 1, "node_id": "n", "artifact_id": "a"}).replace(b"\xa1n", b"\xa1\x80"),
        b"\x84"
        + msgspec.msgpack.encode({"version": 1, "node_id": "n", "artifact_id": "a"})[1:]
        + b"\xa1x"
        + b"\x91" * 200_000
        + b"\xc0",  # an unknown field nested past the recursion limit
    ],
)
def test_bad_handshake(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="bad handshake"):
        FrameDecoder(MAX_PIECE).feed(HEADER.pack(len(body) + 1, MsgType.HANDSHAKE) + body)


def test_handshake_ignores_unknown_fields() -> None:
    body = msgspec.msgpack.encode({"version": 2, "node_id": "n", "artifact_id": "a", "future": [1, 2]})
    frame = HEADER.pack(len(body) + 1, MsgType.HANDSHAKE) + body
    assert FrameDecoder(MAX_PIECE).feed(frame) == [Handshake(2, "n", "a")]


def test_keepalive_with_body() -> None:
    with pytest.raises(ProtocolError, match="KEEPALIVE with a body"):
        FrameDecoder(MAX_PIECE).feed(HEADER.pack(2, MsgType.KEEPALIVE) + b"\0")


def test_piece_cannot_be_decoded_as_control_message() -> None:
    with pytest.raises(ProtocolError, match="PIECE cannot be decoded"):
        wire.decode_body(MsgType.PIECE, b"\0" * 8)


def test_goodbye_with_invalid_utf8_decodes_with_replacement() -> None:
    (msg,) = FrameDecoder(MAX_PIECE).feed(HEADER.pack(3, MsgType.GOODBYE) + b"\xff\xfe")
    assert isinstance(msg, Goodbye) and "\ufffd" in msg.reason


@FAST
@given(st.binary(max_size=200), cut_lists)
def test_random_bytes_raise_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder(64)
    try:
        for chunk in split(data, cuts):
            dec.feed(chunk)
    except ProtocolError:
        pass


@FAST
@given(items, st.integers(min_value=0, max_value=1 << 20), st.integers(min_value=0, max_value=255))
def test_corrupting_one_byte_raises_only_protocol_error(msgs: list, pos: int, xor: int) -> None:
    stream = bytearray(b"".join(_encode_item(m) for m in msgs) or b"\0")
    stream[pos % len(stream)] ^= xor
    try:
        FrameDecoder(MAX_PIECE).feed(bytes(stream))
    except ProtocolError:
        pass


# ------------------------------------------------------------------------------------------ bitfield checks
@pytest.mark.parametrize(("num_pieces", "nbytes"), [(0, 0), (1, 1), (8, 1), (9, 2), (16, 2), (17, 3)])
def test_bitfield_bytes(num_pieces: int, nbytes: int) -> None:
    assert wire.bitfield_bytes(num_pieces) == nbytes
    wire.check_bitfield(b"\xff" * nbytes if num_pieces % 8 == 0 else b"\0" * nbytes, num_pieces)


@pytest.mark.parametrize(("bits", "num_pieces"), [(b"", 1), (b"\0", 9), (b"\0\0", 8), (b"\0", 0)])
def test_bitfield_wrong_length(bits: bytes, num_pieces: int) -> None:
    with pytest.raises(ProtocolError, match="bitfield of"):
        wire.check_bitfield(bits, num_pieces)


def test_bitfield_spare_bits() -> None:
    wire.check_bitfield(b"\xff\x80", 9)  # piece 8 is the MSB of byte 1
    for spare_bit in range(7):
        with pytest.raises(ProtocolError, match="past the last piece"):
            wire.check_bitfield(bytes([0xFF, 0x80 | (1 << spare_bit)]), 9)
    wire.check_bitfield(b"\xfe", 7)
    with pytest.raises(ProtocolError, match="past the last piece"):
        wire.check_bitfield(b"\xff", 7)


def test_a_run_of_have_frames_is_read_in_one_pass_up_to_the_first_other_frame() -> None:
    haves = b"".join(wire.encode(wire.Have(i)) for i in (7, 0, 2**32 - 1))
    req = wire.encode(wire.Request(4))
    assert wire.have_run(haves + req + wire.encode(wire.Have(1))) == ([7, 0, 2**32 - 1], len(haves))
    assert wire.have_run(bytearray(req + haves), len(req)) == ([7, 0, 2**32 - 1], len(req) + len(haves))
    assert wire.have_run(req + haves) == ([], 0)  # not a HAVE: nothing taken
    assert wire.have_run(haves[:-1]) == ([7, 0], 2 * wire.HAVE_FRAME_SIZE)  # a partial frame waits for its rest
    assert wire.have_run(b"") == ([], 0)
    # a frame with a HAVE's type but another length is not part of a run (on_header judges it)
    odd = wire.HEADER.pack(6, wire.MsgType.HAVE) + b"\0" * 5
    assert wire.have_run(odd) == ([], 0)
