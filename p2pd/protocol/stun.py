"""STUN messages (RFC 5389 Binding, RFC 3489/5780 CHANGE-REQUEST) for NAT detection, sans-IO.

Bytes are parsed and built by aioice's STUN codec (`aioice.stun`), not here: a codec is where the
subtle bugs live (padding, XOR-ed addresses, length checks), and aioice's is the one aiortc runs
against real STUN servers. This module only says which messages p2pd sends and accepts, and turns
every way a hostile datagram can make the codec fail into one exception, `StunError`.

Both ends use it: the tracker's responder (`tracker/stun.py`) parses requests and builds answers,
the node's NAT detection (`p2pd/nat_detect.py`) builds requests and parses answers.

Classic RFC 3489 requests carry a 128-bit transaction id instead of the magic cookie. RFC 5389
§12.2 says to answer them anyway (MAPPED-ADDRESS only, the 128-bit id echoed), which keeps classic
tools such as pynat or pystun able to classify against a p2pd tracker. aioice always writes the
cookie, so for those answers the first 32 bits of the id are put back after encoding.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import os
import struct
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aioice import stun as _stun

COOKIE = 0x2112A442  # RFC 5389 §6 (aioice's codec checks it on every message it parses)
HEADER_LENGTH = 20
MAX_MESSAGE = 548  # RFC 3489's limit for UDP; larger datagrams are not STUN we answer
CHANGE_IP = 0x4
CHANGE_PORT = 0x2

Addr = tuple[str, int]


class StunError(ValueError):
    """A datagram that is not a STUN message we accept (malformed, truncated, wrong kind)."""


def looks_like_stun(data: bytes) -> bool:
    """Cheap demultiplexing test (RFC 7983): a STUN message starts with two zero bits and is ≥ 20 bytes.

    The tracker's UDP heartbeats are msgpack arrays (first byte 0x9X), so both share one port."""
    return len(data) >= HEADER_LENGTH and data[0] < 4


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """A Binding request as the responder needs it."""

    transaction_id: bytes  # 16 bytes: the cookie (or a classic request's first id word) and the 96-bit id
    classic: bool  # RFC 3489 client: no magic cookie
    change_ip: bool
    change_port: bool


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """What a node learns from one answer (success or error)."""

    transaction_id: bytes  # the 96-bit id (after the cookie)
    mapped: Addr | None  # XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS
    other: Addr | None  # OTHER-ADDRESS (RFC 5780), else CHANGED-ADDRESS (RFC 3489): the alternate address
    origin: Addr | None  # RESPONSE-ORIGIN, else SOURCE-ADDRESS: where the server says it answered from
    error: tuple[int, str] | None  # ERROR-CODE of an error response


@functools.cache
def _codec() -> ModuleType:
    """aioice's codec, imported on first use: `import aioice` pulls in its whole ICE stack (asyncio, dnspython,
    ifaddr: ~0.2 s of CPU), which a restarting daemon must not pay before it serves its peers again.
    `load_codec` lets the NAT monitor import it off the event loop."""
    return importlib.import_module("aioice.stun")


def load_codec() -> None:
    """Import the codec now (in a worker thread: the caller's event loop keeps running meanwhile)."""
    _codec()


def _parse(data: bytes) -> _stun.Message:
    if len(data) > MAX_MESSAGE:
        raise StunError(f"{len(data)} bytes: longer than any STUN message we accept ({MAX_MESSAGE})")
    if not looks_like_stun(data):
        raise StunError("not a STUN message (first two bits not zero, or shorter than 20 bytes)")
    try:
        msg: _stun.Message = _codec().parse_message(data)
    except (ValueError, struct.error) as e:  # aioice raises both (and UnicodeDecodeError, a ValueError)
        raise StunError(f"malformed STUN message: {e}") from None
    return msg


def new_transaction_id() -> bytes:
    return os.urandom(12)


def binding_request(transaction_id: bytes, *, change_ip: bool = False, change_port: bool = False) -> bytes:
    """An RFC 5389 Binding request; CHANGE-REQUEST is added only when a change is asked for."""
    attrs = {}
    if change_ip or change_port:
        attrs["CHANGE-REQUEST"] = (CHANGE_IP if change_ip else 0) | (CHANGE_PORT if change_port else 0)
    c = _codec()
    return bytes(c.Message(c.Method.BINDING, c.Class.REQUEST, transaction_id, attrs))


def parse_request(data: bytes) -> BindingRequest:
    """A Binding request, or StunError (anything else: responses, indications, other methods, garbage)."""
    msg, c = _parse(data), _codec()
    if msg.message_method != c.Method.BINDING or msg.message_class != c.Class.REQUEST:
        raise StunError(f"not a Binding request ({msg.message_method.name} {msg.message_class.name})")
    change = msg.attributes.get("CHANGE-REQUEST", 0)
    classic = struct.unpack_from("!I", data, 4)[0] != COOKIE
    return BindingRequest(
        transaction_id=bytes(data[4:20]),
        classic=classic,
        change_ip=bool(change & CHANGE_IP),
        change_port=bool(change & CHANGE_PORT),
    )


def _plain(addr: Addr) -> Addr:
    """An IPv4-mapped IPv6 source (a dual-stack socket) reported as the IPv4 address it is."""
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])  # a link-local source carries its scope
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), addr[1]
    return str(ip), addr[1]


def _encode(req: BindingRequest, msg_class: _stun.Class, attrs: dict[str, object]) -> bytes:
    c = _codec()
    msg = c.Message(c.Method.BINDING, msg_class, req.transaction_id[4:], attrs)
    out = bytes(msg)
    if req.classic:  # aioice writes the cookie: put the classic client's first id word back
        out = out[:4] + req.transaction_id[:4] + out[8:]
    return out


def success_response(
    req: BindingRequest, mapped: Addr, *, other: Addr | None = None, origin: Addr | None = None
) -> bytes:
    """Binding success: the source address seen (XOR-MAPPED-ADDRESS for RFC 5389 clients, MAPPED-ADDRESS
    for everyone), the alternate address when the server has one, and where the answer leaves from."""
    mapped = _plain(mapped)
    attrs: dict[str, object] = {}
    if not req.classic:
        attrs["XOR-MAPPED-ADDRESS"] = mapped
    attrs["MAPPED-ADDRESS"] = mapped
    if origin is not None:
        attrs["SOURCE-ADDRESS"] = origin
        attrs["RESPONSE-ORIGIN"] = origin
    if other is not None:
        attrs["CHANGED-ADDRESS"] = other
        attrs["OTHER-ADDRESS"] = other
    return _encode(req, _codec().Class.RESPONSE, attrs)


def error_response(req: BindingRequest, code: int, reason: str) -> bytes:
    return _encode(req, _codec().Class.ERROR, {"ERROR-CODE": (code, reason)})


def parse_response(data: bytes) -> BindingResponse:
    """A Binding success or error response, or StunError."""
    msg, c = _parse(data), _codec()
    if msg.message_method != c.Method.BINDING or msg.message_class not in (c.Class.RESPONSE, c.Class.ERROR):
        raise StunError(f"not a Binding response ({msg.message_method.name} {msg.message_class.name})")
    a = msg.attributes
    error = a.get("ERROR-CODE") if msg.message_class == c.Class.ERROR else None
    if msg.message_class == c.Class.ERROR and error is None:
        error = (500, "error response without ERROR-CODE")
    mapped = a.get("XOR-MAPPED-ADDRESS") or a.get("MAPPED-ADDRESS")
    if msg.message_class == c.Class.RESPONSE and mapped is None:
        raise StunError("Binding success without a mapped address")
    return BindingResponse(
        transaction_id=msg.transaction_id,
        mapped=mapped,
        other=a.get("OTHER-ADDRESS") or a.get("CHANGED-ADDRESS"),
        origin=a.get("RESPONSE-ORIGIN") or a.get("SOURCE-ADDRESS"),
        error=error,
    )
