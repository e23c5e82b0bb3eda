"""One peer connection's protocol, as a state machine with no I/O (in the manner of h11).

The I/O layer (p2pd/peer.py) hands a run of whole HAVE frames it holds to `on_haves` (the commonest
frame, decoded in one pass), else reads a frame header and hands it to `on_header`, which says what the
body is; it reads that many bytes and hands them to `on_control`, which returns what happened
(`BitfieldReceived`, `UploadRequested`, ...) for the swarm to act on; or, for a PIECE, hands the
sub-header to `on_piece_header`, reads the data straight into a piece buffer (no copy through this
object), and asks `on_piece_received` whether the piece is still wanted. Everything we send to the
peer except piece data is queued here as frames (`take_output`); the peer's requests wait in
`uploads` until the writer gets to them.

Every rule of a connection lives here and raises `ProtocolError` when the peer breaks it: BITFIELD
first and only once, indices in range, no piece we did not ask for, piece lengths as the manifest
says, at most `max_queued_requests` of its requests queued, control bodies no longer than their
type allows, BAD_PIECE only for a piece we sent it (once each). Which requests are in flight is the
picker's record (one record for the whole swarm); the session asks it, it keeps no copy.
Having no I/O, it runs unchanged in the daemon, in unit tests and in a simulator.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from p2pd.errors import CloseReason
from p2pd.protocol import bitfield as bits
from p2pd.protocol import wire
from p2pd.protocol.manifest import Manifest
from p2pd.protocol.picker import Arrival, Picker

MAX_COMPRESSED_OVERHEAD = 1024  # zstd frame overhead on an incompressible piece (level 1 never grows it more)


class PeerClosed(Exception):
    """The connection is over; `reason` is what the swarm decides on, the text is for people."""

    def __init__(self, reason: CloseReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class BitfieldReceived:
    mask: int  # bit i = the peer has piece i


@dataclass(frozen=True, slots=True)
class HaveReceived:
    index: int


@dataclass(frozen=True, slots=True)
class HavesReceived:
    """A run of HAVE frames read at once (`on_haves`), in the order they came."""

    indices: list[int]


@dataclass(frozen=True, slots=True)
class UploadRequested:
    """The peer asks for a piece: the swarm answers with `accept_upload` or `defer` (the seed policy)."""

    index: int


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """The peer does not have a piece we asked it for."""

    index: int


@dataclass(frozen=True, slots=True)
class RequestDeferred:
    """The peer has the piece but asks us to fetch it elsewhere for now."""

    index: int


@dataclass(frozen=True, slots=True)
class BadPieceReported:
    """The peer says a piece we sent it fails verification: re-verify our copy from disk."""

    index: int


Event = (
    BitfieldReceived
    | HaveReceived
    | HavesReceived
    | UploadRequested
    | RequestRejected
    | RequestDeferred
    | BadPieceReported
)


class PeerSession:
    """The protocol state of one connection to one remote node, for one artifact."""

    def __init__(
        self,
        manifest: Manifest,
        picker: Picker[PeerSession],
        *,
        max_queued_requests: int = 64,
        on_output: Callable[[], None] | None = None,
    ) -> None:
        self.manifest = manifest
        self.n = manifest.num_pieces
        self.picker = picker
        self.max_queued_requests = max_queued_requests
        self.on_output = on_output  # the I/O layer's wakeup: frames or uploads are waiting to be sent
        self.remote_have = 0  # pieces the remote has announced
        self.bitfield_received = False
        self.bitfield_sent = False
        self.uploads: collections.deque[int] = collections.deque()  # its requests to us, in order
        self.sent_mask = 0  # pieces we sent on this connection and it has not reported bad (bit i = piece i)
        self.reported_mask = 0  # pieces we told it were bad (each reported once)
        self._out = bytearray()
        self._held_haves = bytearray()  # HAVE frames held back (`hold_have`): they leave with the next frame or flush

    # -- incoming ----------------------------------------------------------------------------------
    def on_header(self, header: bytes) -> tuple[wire.MsgType, int]:
        """A frame header: (type, body length) once the limits and the BITFIELD-first rule hold.

        A control body's length is checked against what its type can hold before a byte of it is
        read, so a peer cannot make us buffer more than a bitfield of this artifact per connection
        (a partial 1 MiB frame on each of 300 connections was 450 MB: issue #14 row 4).
        """
        t, n = wire.parse_header(header, self.manifest.piece_size)
        if not self.bitfield_received and t is not wire.MsgType.BITFIELD:
            raise wire.ProtocolError(f"expected BITFIELD after handshake, got {t.name}")
        if t is wire.MsgType.HANDSHAKE:  # refused before its body is read
            raise wire.ProtocolError("unexpected Handshake after handshake")
        limit = self._body_limit(t)
        if limit is not None and n > limit:
            raise wire.ProtocolError(f"{t.name} frame of {n} bytes exceeds limit {limit}")
        return t, n

    def _body_limit(self, t: wire.MsgType) -> int | None:
        """The largest body a control frame of type `t` may have here (None: a PIECE, checked later)."""
        if t is wire.MsgType.PIECE:
            return None
        if t is wire.MsgType.BITFIELD:
            return wire.bitfield_bytes(self.n)
        if t is wire.MsgType.GOODBYE:
            return wire.MAX_GOODBYE_REASON
        if t is wire.MsgType.KEEPALIVE:
            return 0
        return wire.U32.size  # HAVE, REQUEST, CANCEL, REJECT, DEFER, BAD_PIECE

    def on_control(self, t: wire.MsgType, body: bytes) -> Event | None:
        """A control frame's body; returns what the swarm must act on, if anything."""
        msg = wire.decode_body(t, body)
        if isinstance(msg, wire.Have):
            self._check_index(msg.index, "HAVE")
            self.remote_have |= 1 << msg.index
            return HaveReceived(msg.index)
        if isinstance(msg, wire.Request):
            self._check_index(msg.index, "REQUEST")
            if len(self.uploads) >= self.max_queued_requests:
                raise wire.ProtocolError(f"more than {self.max_queued_requests} requests queued")
            return UploadRequested(msg.index)
        if isinstance(msg, wire.Cancel):
            try:
                self.uploads.remove(msg.index)
            except ValueError:
                pass  # already sent or never asked: a cancel is advisory
            return None
        if isinstance(msg, wire.Reject | wire.Defer):
            if self.picker.arrival(self, msg.index) is not Arrival.EXPECTED:
                return None  # an answer to a request we since cancelled, or a stray one: nothing to undo
            return RequestRejected(msg.index) if isinstance(msg, wire.Reject) else RequestDeferred(msg.index)
        if isinstance(msg, wire.Bitfield):
            if self.bitfield_received:
                raise wire.ProtocolError("second BITFIELD")
            wire.check_bitfield(msg.bits, self.n)
            self.bitfield_received = True
            self.remote_have = bits.from_bytes(msg.bits, self.n)
            return BitfieldReceived(self.remote_have)
        if isinstance(msg, wire.BadPiece):
            self._check_index(msg.index, "BAD_PIECE")
            bit = 1 << msg.index
            if not self.sent_mask & bit:  # only a piece we sent, once: a report costs us a piece read
                raise wire.ProtocolError(f"BAD_PIECE for piece {msg.index} that we did not send")
            self.sent_mask &= ~bit
            return BadPieceReported(msg.index)
        if isinstance(msg, wire.Goodbye):
            raise PeerClosed(CloseReason.GOODBYE, msg.reason or "no reason given")
        if isinstance(msg, wire.KeepAlive):
            return None
        raise wire.ProtocolError(f"unexpected {type(msg).__name__} after handshake")

    def on_haves(self, indices: list[int]) -> HavesReceived:
        """A run of whole HAVE frames (`wire.have_run`): the same rules as each through `on_header` and
        `on_control`, one event for all of them."""
        if not self.bitfield_received:
            raise wire.ProtocolError("expected BITFIELD after handshake, got HAVE")
        have, n = self.remote_have, self.n
        for i in indices:
            if not 0 <= i < n:
                raise wire.ProtocolError(f"HAVE for piece {i} out of range")
            have |= 1 << i
        self.remote_have = have
        return HavesReceived(indices)

    def on_piece_header(self, sub: bytes, body_len: int) -> wire.PieceHeader:
        """A PIECE frame's sub-header: the data that follows is `length` bytes, to be read whole."""
        ph = wire.parse_piece_sub(sub, body_len)
        self._check_index(ph.index, "PIECE")
        if self.picker.arrival(self, ph.index) is Arrival.UNREQUESTED:
            raise wire.ProtocolError(f"unrequested piece {ph.index}")
        expected = self.manifest.piece_length(ph.index)
        if ph.codec == wire.CODEC_RAW and ph.length != expected:
            raise wire.ProtocolError(f"piece {ph.index} has {ph.length} bytes, expected {expected}")
        if ph.codec == wire.CODEC_ZSTD and ph.length > expected + MAX_COMPRESSED_OVERHEAD:
            raise wire.ProtocolError(f"compressed piece {ph.index} larger than the piece")
        return ph

    def check_decompressed(self, index: int, length: int) -> None:
        expected = self.manifest.piece_length(index)
        if length != expected:
            raise wire.ProtocolError(f"piece {index} decompressed to {length} bytes, expected {expected}")

    def on_piece_received(self, index: int) -> bool:
        """The piece's data is all here: True if we still want it (else it was cancelled: drop it)."""
        return self.picker.arrived(self, index) is Arrival.EXPECTED

    def _check_index(self, index: int, what: str) -> None:
        if not 0 <= index < self.n:
            raise wire.ProtocolError(f"{what} for piece {index} out of range")

    # -- outgoing ----------------------------------------------------------------------------------
    def _queue(self, msg: wire.Message) -> None:
        self.release_haves()  # held HAVEs ride along with any frame that goes out anyway (in the order they were made)
        self._out += wire.encode(msg)
        if self.on_output is not None:
            self.on_output()

    def send_bitfield(self, have: int) -> None:
        """The first frame after the handshake, sent exactly once."""
        if self.bitfield_sent:
            raise RuntimeError("BITFIELD already sent on this connection")
        if self._held_haves:
            raise RuntimeError("HAVE held before the BITFIELD")
        self.bitfield_sent = True
        self._queue(wire.Bitfield(bits.to_bytes(have, self.n)))

    def send_have(self, index: int) -> None:
        self._queue(wire.Have(index))

    def hold_have(self, index: int) -> None:
        """Announce `index`, but without waking the writer: the HAVE leaves with the next frame queued here or
        at `flush_haves`, whichever comes first.

        In a swarm of n peers every completed piece is n HAVEs, and each one alone costs a wakeup of our writer
        (and a send) and of the peer's reader: at 1 + 32 that was most of the control traffic that kept the
        daemons CPU-bound. Held for a few tens of milliseconds, several go out in one send and are read in one
        wakeup; the frames on the wire are the same, so any peer reads them as before.
        """
        self._held_haves += wire.encode(wire.Have(index))

    @property
    def holds_haves(self) -> bool:
        return bool(self._held_haves)

    def release_haves(self) -> bool:
        """Queue the held HAVEs without a wakeup (for a writer that is awake anyway); True if there were any."""
        if not self._held_haves:
            return False
        self._out += self._held_haves
        self._held_haves.clear()
        return True

    def flush_haves(self) -> None:
        """Queue the held HAVEs (one wakeup of the writer for all of them)."""
        if self.release_haves() and self.on_output is not None:
            self.on_output()

    def request_more(self, depth: int) -> int:
        """Ask for pieces (the picker decides which) until `depth` are pending; returns how many were asked."""
        picker = self.picker
        if not picker.knows(self):
            return 0
        asked = 0
        while picker.outstanding(self) < depth:
            i = picker.next_request(self)
            if i is None:
                break
            self._queue(wire.Request(i))
            asked += 1
        return asked

    def cancel(self, index: int) -> None:
        self._queue(wire.Cancel(index))

    def accept_upload(self, index: int) -> None:
        self.uploads.append(index)
        if self.on_output is not None:
            self.on_output()

    def piece_sent(self, index: int) -> None:
        """We sent piece `index` on this connection: the peer may report it bad (once)."""
        self.sent_mask |= 1 << index

    def report_bad(self, index: int) -> None:
        """Tell the peer the piece it sent fails verification (once per piece and connection)."""
        bit = 1 << index
        if not self.reported_mask & bit:
            self.reported_mask |= bit
            self._queue(wire.BadPiece(index))

    def reject(self, index: int) -> None:
        self._queue(wire.Reject(index))

    def defer(self, index: int) -> None:
        self._queue(wire.Defer(index))

    def keepalive(self) -> None:
        self._queue(wire.KeepAlive())

    def goodbye(self, reason: str) -> None:
        """We leave: no more uploads, and GOODBYE is the last frame."""
        self.uploads.clear()
        self._queue(wire.Goodbye(reason))

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def take_output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_upload(self) -> int | None:
        return self.uploads.popleft() if self.uploads else None
