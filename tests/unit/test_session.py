"""Every rule of a peer connection, on the sans-IO session: fed frames, checked for what it returns.

`drive` plays the I/O layer's part (header, then body or piece sub-header and data) over a byte
string, so the same frames can come from the wire codec, from hypothesis, or from a fuzzer.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pd.errors import CloseReason
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol import session as ps
from p2pd.protocol import wire
from p2pd.protocol.picker import Picker

PIECE = 4096
PIECES = 10
LAST = 500  # the last piece is short


def manifest() -> mf.Manifest:
    size = PIECE * (PIECES - 1) + LAST
    return mf.build([mf.FileEntry("blob.bin", size)], PIECE, b"\0" * (mf.DIGEST_SIZE * PIECES), single_file=True)


def new_session(
    have: set[int] | None = None, *, max_queued_requests: int = 64, on_output: Callable[[], None] | None = None
) -> ps.PeerSession:
    m = manifest()
    picker: Picker[ps.PeerSession] = Picker(m.num_pieces, have or set(), seed=7)
    return ps.PeerSession(m, picker, max_queued_requests=max_queued_requests, on_output=on_output)


def frames(*msgs: wire.Message) -> bytes:
    return b"".join(wire.encode(m) for m in msgs)


def piece_frame(index: int, data: bytes, codec: int = wire.CODEC_RAW) -> bytes:
    return wire.encode_piece_header(index, codec, len(data)) + data


def drive(s: ps.PeerSession, data: bytes) -> list[ps.Event | tuple[str, int, bool]]:
    """What the reader task does, over a byte string; ("piece", i, wanted) for each piece read."""
    out: list[ps.Event | tuple[str, int, bool]] = []
    pos = 0
    while pos + wire.HEADER_SIZE <= len(data):
        t, n = s.on_header(data[pos : pos + wire.HEADER_SIZE])
        pos += wire.HEADER_SIZE
        if t is wire.MsgType.PIECE:
            ph = s.on_piece_header(data[pos : pos + wire.PIECE_SUB_SIZE], n)
            pos += wire.PIECE_SUB_SIZE + ph.length
            out.append(("piece", ph.index, s.on_piece_received(ph.index)))
            continue
        event = s.on_control(t, data[pos : pos + n])
        pos += n
        if event is not None:
            out.append(event)
    return out


def opened(have_remote: set[int] | range = range(PIECES), *, max_queued_requests: int = 64) -> ps.PeerSession:
    """A session past the remote's BITFIELD, known to the picker as a peer holding `have_remote`."""
    s = new_session(max_queued_requests=max_queued_requests)
    drive(s, frames(wire.Bitfield(bits.to_bytes(bits_of(have_remote), PIECES))))
    s.picker.add_peer(s, have_remote)
    return s


def bits_of(pieces: set[int] | range) -> int:
    return sum(1 << i for i in pieces)


# --------------------------------------------------------------------------------------------- BITFIELD
def test_the_bitfield_comes_first_and_sets_what_the_remote_has() -> None:
    s = new_session()
    events = drive(s, frames(wire.Bitfield(bits.to_bytes(0b101, PIECES))))
    assert events == [ps.BitfieldReceived(0b101)]
    assert s.remote_have == 0b101


@pytest.mark.parametrize("first", [wire.Have(1), wire.Request(1), wire.KeepAlive(), wire.Goodbye("x")])
def test_anything_before_the_bitfield_is_a_protocol_error(first: wire.Message) -> None:
    with pytest.raises(wire.ProtocolError, match="expected BITFIELD"):
        drive(new_session(), frames(first))


def test_a_piece_before_the_bitfield_is_a_protocol_error() -> None:
    with pytest.raises(wire.ProtocolError, match="expected BITFIELD"):
        drive(new_session(), piece_frame(0, b"x" * PIECE))


def test_a_second_bitfield_is_a_protocol_error() -> None:
    bf = wire.Bitfield(bits.to_bytes(0, PIECES))
    with pytest.raises(wire.ProtocolError, match="second BITFIELD"):
        drive(new_session(), frames(bf, bf))


@pytest.mark.parametrize("raw", [b"\xff", b"\xff\xff\xff", b"\xff\xff"])
def test_a_bitfield_of_the_wrong_size_or_with_spare_bits_set_is_refused(raw: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        drive(new_session(), frames(wire.Bitfield(raw)))


def test_a_handshake_after_the_handshake_is_refused() -> None:
    s = opened()
    with pytest.raises(wire.ProtocolError, match="unexpected Handshake"):
        drive(s, frames(wire.Handshake(wire.PROTOCOL_VERSION, "a" * 32, "b" * 64)))


# --------------------------------------------------------------------------------------------- indices
@pytest.mark.parametrize("msg", [wire.Have(PIECES), wire.Request(PIECES), wire.Have(2**32 - 1)])
def test_indices_out_of_range_are_refused(msg: wire.Message) -> None:
    with pytest.raises(wire.ProtocolError, match="out of range"):
        drive(opened(), frames(msg))


def test_have_adds_to_what_the_remote_has() -> None:
    s = opened(set())
    assert drive(s, frames(wire.Have(3), wire.Have(3))) == [ps.HaveReceived(3), ps.HaveReceived(3)]
    assert s.remote_have == 1 << 3


def test_a_run_of_haves_is_one_event_under_the_same_rules() -> None:
    s = opened(set())
    assert s.on_haves([3, 5, 3]) == ps.HavesReceived([3, 5, 3])
    assert s.remote_have == (1 << 3) | (1 << 5)
    with pytest.raises(wire.ProtocolError, match="out of range"):
        s.on_haves([1, PIECES])
    with pytest.raises(wire.ProtocolError, match="expected BITFIELD"):
        new_session().on_haves([1])


# --------------------------------------------------------------------------------------------- pieces
def test_a_piece_we_asked_for_is_wanted_and_stops_being_pending() -> None:
    s = opened()
    assert s.request_more(2) == 2
    asked = sorted(s.picker.pending[s])
    got = drive(s, piece_frame(asked[0], b"x" * s.manifest.piece_length(asked[0])))
    assert got == [("piece", asked[0], True)]
    assert s.picker.outstanding(s) == 1


def test_an_unrequested_piece_is_a_protocol_error() -> None:
    s = opened()
    with pytest.raises(wire.ProtocolError, match="unrequested piece 4"):
        drive(s, piece_frame(4, b"x" * PIECE))


def test_a_piece_we_cancelled_is_read_and_dropped() -> None:
    s = opened()
    s.request_more(1)
    (i,) = s.picker.pending[s]
    assert s.picker.piece_verified(i) == {s}  # another peer's copy won: this one is cancelled
    assert drive(s, piece_frame(i, b"x" * s.manifest.piece_length(i))) == [("piece", i, False)]
    with pytest.raises(wire.ProtocolError, match="unrequested"):  # and only once
        drive(s, piece_frame(i, b"x" * s.manifest.piece_length(i)))


def test_a_raw_piece_must_have_the_manifest_length() -> None:
    s = opened()
    s.request_more(1)
    (i,) = s.picker.pending[s]
    with pytest.raises(wire.ProtocolError, match="expected"):
        drive(s, piece_frame(i, b"x" * (s.manifest.piece_length(i) - 1)))


def test_the_short_last_piece_is_checked_against_its_own_length() -> None:
    s = opened({PIECES - 1})
    s.request_more(1)
    assert s.picker.pending[s] == {PIECES - 1}
    assert drive(s, piece_frame(PIECES - 1, b"x" * LAST)) == [("piece", PIECES - 1, True)]


def test_a_compressed_piece_may_not_be_larger_than_the_piece_plus_overhead() -> None:
    s = opened({PIECES - 1})
    s.request_more(1)
    (i,) = s.picker.pending[s]
    with pytest.raises(wire.ProtocolError, match="larger than the piece"):
        drive(s, piece_frame(i, b"x" * (LAST + ps.MAX_COMPRESSED_OVERHEAD + 1), wire.CODEC_ZSTD))
    with pytest.raises(wire.ProtocolError, match="decompressed to"):
        s.check_decompressed(i, PIECE + 1)


def test_a_piece_frame_larger_than_a_piece_is_refused_at_the_header() -> None:
    s = opened()
    header = wire.encode_piece_header(0, wire.CODEC_RAW, PIECE + 1)[: wire.HEADER_SIZE]
    with pytest.raises(wire.ProtocolError, match="exceeds limit"):
        s.on_header(header)


# --------------------------------------------------------------------------------------------- their requests
def test_requests_are_queued_up_to_the_limit_then_refused() -> None:
    s = opened(max_queued_requests=3)
    for i in range(3):
        (event,) = drive(s, frames(wire.Request(i)))
        assert event == ps.UploadRequested(i)
        s.accept_upload(i)
    with pytest.raises(wire.ProtocolError, match="more than 3 requests"):
        drive(s, frames(wire.Request(5)))


def test_cancel_removes_a_queued_request_and_is_otherwise_ignored() -> None:
    s = opened()
    for i in (1, 2):
        s.accept_upload(i)
    assert drive(s, frames(wire.Cancel(1), wire.Cancel(9))) == []
    assert s.next_upload() == 2
    assert s.next_upload() is None


def test_reject_and_defer_count_only_for_pending_requests() -> None:
    s = opened()
    s.request_more(2)
    a, b = sorted(s.picker.pending[s])
    other = next(i for i in range(PIECES) if i not in (a, b))
    got = drive(s, frames(wire.Reject(a), wire.Defer(b), wire.Reject(other), wire.Defer(other)))
    assert got == [ps.RequestRejected(a), ps.RequestDeferred(b)]


def test_goodbye_ends_the_session_with_its_reason() -> None:
    with pytest.raises(ps.PeerClosed) as exc:
        drive(opened(), frames(wire.Goodbye("node shutting down")))
    assert exc.value.reason is CloseReason.GOODBYE
    assert "node shutting down" in str(exc.value)


# --------------------------------------------------------------------------------------------- what we send
def test_outgoing_frames_are_queued_in_order_and_wake_the_writer() -> None:
    wakeups: list[int] = []
    s = new_session(on_output=lambda: wakeups.append(1))
    s.send_bitfield(0b11)
    s.send_have(2)
    s.reject(3)
    s.defer(4)
    s.keepalive()
    s.accept_upload(5)
    decoded = wire.FrameDecoder(PIECE).feed(s.take_output())
    assert decoded == [
        wire.Bitfield(bits.to_bytes(0b11, PIECES)),
        wire.Have(2),
        wire.Reject(3),
        wire.Defer(4),
        wire.KeepAlive(),
    ]
    assert len(wakeups) == 6
    assert not s.has_output
    with pytest.raises(RuntimeError):
        s.send_bitfield(0)


def test_held_haves_wake_nobody_and_leave_together() -> None:
    """A held HAVE costs no wakeup of the writer; a flush queues all of them, in order, for one wakeup."""
    wakeups: list[int] = []
    s = new_session(on_output=lambda: wakeups.append(1))
    s.send_bitfield(0)
    s.take_output()
    wakeups.clear()
    for i in (4, 1, 7):
        s.hold_have(i)
    assert not s.has_output and s.holds_haves and not wakeups
    s.flush_haves()
    assert len(wakeups) == 1 and not s.holds_haves
    assert wire.FrameDecoder(PIECE).feed(s.take_output()) == [wire.Have(4), wire.Have(1), wire.Have(7)]
    s.flush_haves()  # nothing held: no wakeup
    assert len(wakeups) == 1


def test_held_haves_ride_with_the_next_frame() -> None:
    s = opened()
    s.hold_have(3)
    s.reject(2)
    assert not s.holds_haves
    assert wire.FrameDecoder(PIECE).feed(s.take_output()) == [wire.Have(3), wire.Reject(2)]
    s.hold_have(5)
    assert s.release_haves() and not s.release_haves()  # the writer, awake anyway, takes them at no wakeup
    assert wire.FrameDecoder(PIECE).feed(s.take_output()) == [wire.Have(5)]


def test_a_have_held_before_the_bitfield_is_a_bug() -> None:
    s = new_session()
    s.hold_have(1)
    with pytest.raises(RuntimeError):
        s.send_bitfield(0)


outgoing_ops = st.lists(
    st.tuples(st.sampled_from(["hold", "send", "reject", "flush", "release"]), st.integers(0, PIECES - 1)),
    max_size=40,
)


@settings(max_examples=150, deadline=None, database=None)
@given(outgoing_ops)
def test_holding_haves_changes_when_frames_leave_never_which_or_their_order(ops: list[tuple[str, int]]) -> None:
    """Whatever mix of held and sent frames: every frame goes out once, in the order it was made, and the writer
    is woken only for a frame that is not held (or a flush that has something to send)."""
    wakeups: list[int] = []
    s = new_session(on_output=lambda: wakeups.append(1))
    s.send_bitfield(0)
    s.take_output()
    wakeups.clear()
    made: list[wire.Message] = []
    wire_out = b""
    expected_wakeups = 0
    for op, i in ops:
        held = s.holds_haves
        if op == "hold":
            s.hold_have(i)
            made.append(wire.Have(i))
        elif op == "send":
            s.send_have(i)
            made.append(wire.Have(i))
            expected_wakeups += 1
        elif op == "reject":
            s.reject(i)
            made.append(wire.Reject(i))
            expected_wakeups += 1
        elif op == "flush":
            s.flush_haves()
            expected_wakeups += held
        else:
            s.release_haves()
        if i % 3 == 0:  # the writer runs now and then
            wire_out += s.take_output()
    s.release_haves()
    wire_out += s.take_output()
    assert wire.FrameDecoder(PIECE).feed(wire_out) == made
    assert len(wakeups) == expected_wakeups


def test_requests_fill_the_pipeline_from_the_picker_only() -> None:
    s = opened({1, 2, 3})
    assert s.request_more(2) == 2
    assert s.request_more(2) == 0  # full
    sent = wire.FrameDecoder(PIECE).feed(s.take_output())
    assert {m.index for m in sent if isinstance(m, wire.Request)} <= {1, 2, 3}
    unknown = new_session()  # no bitfield yet: the picker does not know it, nothing is asked
    assert unknown.request_more(2) == 0


def test_goodbye_drops_queued_uploads_and_is_the_last_frame() -> None:
    s = opened()
    s.accept_upload(1)
    s.goodbye("bye")
    assert s.next_upload() is None
    assert wire.FrameDecoder(PIECE).feed(s.take_output()) == [wire.Goodbye("bye")]


# --------------------------------------------------------------------------------------------- hostile bytes
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    s = new_session()
    try:
        drive(s, frames(wire.Bitfield(bits.to_bytes(0, PIECES))) + data)
    except (wire.ProtocolError, ps.PeerClosed):
        pass


control = st.one_of(
    st.builds(wire.Have, st.integers(0, PIECES + 2)),
    st.builds(wire.Request, st.integers(0, PIECES + 2)),
    st.builds(wire.Cancel, st.integers(0, 2**32 - 1)),
    st.builds(wire.Reject, st.integers(0, 2**32 - 1)),
    st.builds(wire.Defer, st.integers(0, 2**32 - 1)),
    st.builds(wire.KeepAlive),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(control, max_size=80), st.integers(1, 8))
def test_any_sequence_of_control_frames_keeps_the_invariants(msgs: list[wire.Message], limit: int) -> None:
    """Whatever a peer sends: only range and queue-limit violations are errors, and the state stays sound."""
    s = opened(set(), max_queued_requests=limit)
    for msg in msgs:
        index = getattr(msg, "index", 0)
        try:
            events = drive(s, frames(msg))
        except wire.ProtocolError:
            assert isinstance(msg, wire.Have | wire.Request) and (index >= PIECES or len(s.uploads) >= limit)
            return
        for event in events:
            if isinstance(event, ps.UploadRequested):
                s.accept_upload(event.index)
            assert not isinstance(event, ps.RequestRejected | ps.RequestDeferred)  # we asked for nothing
        assert len(s.uploads) <= limit
        assert s.remote_have < 1 << PIECES


# ------------------------------------------------------------------------------- bounded control bodies
@pytest.mark.parametrize(
    ("t", "body_len"),
    [
        (wire.MsgType.BITFIELD, wire.bitfield_bytes(PIECES) + 1),
        (wire.MsgType.BITFIELD, wire.MAX_CONTROL_FRAME),
        (wire.MsgType.HAVE, 5),
        (wire.MsgType.REQUEST, 1 << 20),
        (wire.MsgType.BAD_PIECE, 5),
        (wire.MsgType.GOODBYE, wire.MAX_GOODBYE_REASON + 1),
        (wire.MsgType.KEEPALIVE, 1),
        (wire.MsgType.HANDSHAKE, 100),
    ],
)
def test_a_control_body_longer_than_its_type_holds_is_refused_from_its_header(t: wire.MsgType, body_len: int) -> None:
    """Refused before a byte of the body is read: a partial 1 MiB frame per connection was 450 MB (#14 row 4)."""
    s = new_session() if t is wire.MsgType.BITFIELD else opened()
    with pytest.raises(wire.ProtocolError, match="exceeds limit|unexpected Handshake"):
        s.on_header(wire.HEADER.pack(body_len + 1, t))


# ------------------------------------------------------------------------------------------ BAD_PIECE
def test_bad_piece_is_accepted_once_for_a_piece_we_sent() -> None:
    s = opened()
    s.piece_sent(3)
    assert drive(s, frames(wire.BadPiece(3))) == [ps.BadPieceReported(3)]
    with pytest.raises(wire.ProtocolError, match="did not send"):  # a second report of the same copy
        drive(s, frames(wire.BadPiece(3)))


@pytest.mark.parametrize("index", [0, PIECES - 1])
def test_bad_piece_for_a_piece_we_never_sent_is_a_protocol_error(index: int) -> None:
    """Otherwise any peer could make us re-read any piece from disk, over and over."""
    with pytest.raises(wire.ProtocolError, match="did not send"):
        drive(opened(), frames(wire.BadPiece(index)))


def test_bad_piece_out_of_range_is_a_protocol_error() -> None:
    s = opened()
    with pytest.raises(wire.ProtocolError, match="out of range"):
        drive(s, frames(wire.BadPiece(PIECES)))


def test_report_bad_queues_one_frame_per_piece() -> None:
    s = opened()
    s.take_output()
    s.report_bad(2)
    s.report_bad(2)
    assert wire.FrameDecoder(PIECE).feed(s.take_output()) == [wire.BadPiece(2)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_after_the_bitfield_raise_only_protocol_errors(data: bytes) -> None:
    """Fuzz: whatever a peer sends, the session answers with events or ProtocolError/PeerClosed."""
    s = opened()
    s.piece_sent(1)
    try:
        drive(s, data)
    except (wire.ProtocolError, ps.PeerClosed):
        pass
