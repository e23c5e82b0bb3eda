"""Length-prefixed msgpack frames for control traffic (local API and tracker RPC).

A frame is a 4-byte big-endian length followed by one msgpack map. Keeping this separate from the
peer wire protocol lets the tracker and the Ray plugin (asyncio) speak it without the peer codec.
An error reply's map is `RpcError.to_wire()`; its code is one of `p2pd.errors.ErrorCode`.
"""

from __future__ import annotations

import struct
from typing import Any, Self

import msgspec

from p2pd.errors import ErrorCode, P2pdError

MAX_FRAME = 16 * 1024 * 1024
_LEN = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class FrameError(ValueError):
    """The peer sent bytes that are not a valid frame; the connection must be closed."""


def encode_frame(obj: Any) -> bytes:
    body = _encoder.encode(obj)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes and yields complete decoded frames."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    @property
    def pending(self) -> int:
        """Bytes of a frame begun and not yet complete (what a slow or hostile sender makes us hold)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf, 0)
            if n > self._max:
                raise FrameError(f"frame length {n} exceeds the {self._max}-byte limit")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            try:
                out.append(_decoder.decode(body))
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:  # bad UTF-8, deep nesting
                raise FrameError(f"undecodable frame: {e}") from e
        return out


class RpcError(P2pdError):
    """A failure reported to the caller with a machine-readable code and a human message."""

    def to_wire(self) -> dict[str, str]:
        """The `error` map of a reply frame."""
        return {"code": self.code.value, "message": self.message}

    @classmethod
    def from_wire(cls, error: Any) -> Self:
        """The error a reply frame carries; a code this version does not know becomes INTERNAL."""
        if not isinstance(error, dict):
            error = {}
        message = error.get("message")
        return cls(ErrorCode.decode(error.get("code")), str(message) if message else "the server gave no message")
