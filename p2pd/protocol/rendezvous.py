"""What a tracker and a relay agree on without talking to each other: one-time relay tokens, and the
few bytes a relay exchanges with each node before it splices their connections.

A relay splices two TCP connections that present the same token. The tracker mints the token for a
pair of registered nodes (A asked to reach B) with the relay's key and hands it to both; the relay
checks it with the same key, so a relay keeps no table of who may meet whom and never dials anyone.
A token names the two nodes and an expiry, and each of the two may present it once: it cannot be
replayed, and no third node can use it. Sans-IO: the caller passes the wall-clock time.

Wire (all on the relay's TCP port, before any p2pd byte):
  node -> relay   "P2PR" | version (1 byte) | token length (1 byte) | token | node id (32 ASCII hex)
  relay -> node   status (1 byte: 0 = paired, 1 = refused) | message length (1 byte) | message (UTF-8)
The relay answers only once the other node has arrived (or with a refusal), so the first byte after
its answer is already the other node's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

TOKEN_VERSION = 1
RELAY_VERSION = 1
RELAY_MAGIC = b"P2PR"
HELLO_FIXED = len(RELAY_MAGIC) + 2  # magic, version, token length
NODE_ID_SIZE = 32
KEY_SIZE = 32
NONCE_SIZE = 12
MAC_SIZE = 16
MAX_TOKEN = 255
TOKEN_TTL = 30.0  # seconds from minting to the last moment a node may present it
STATUS_PAIRED = 0
STATUS_REFUSED = 1
_NODE_ID_RE = re.compile(r"[0-9a-f]{32}\Z")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(tuple[int, str, str, float, bytes])


class TokenError(ValueError):
    """A token the relay must refuse; the message says why (it is logged and sent to the node)."""


class HelloError(ValueError):
    """Bytes that are not a relay greeting."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    a: str  # the node that asked to reach b
    b: str
    expires: float  # wall-clock seconds
    nonce: bytes  # names the pair at the relay


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def mint_token(key: bytes, a: str, b: str, now: float, ttl: float = TOKEN_TTL, nonce: bytes | None = None) -> bytes:
    """A token for nodes a and b at the relay holding `key`, valid until now + ttl."""
    payload = _enc.encode((TOKEN_VERSION, a, b, round(now + ttl, 3), nonce or os.urandom(NONCE_SIZE)))
    return payload + hmac.new(key, payload, hashlib.sha256).digest()[:MAC_SIZE]


def verify_token(keys: Iterable[bytes], token: bytes, node_id: str, now: float) -> TokenClaims:
    """The claims of `token` presented by `node_id`; TokenError unless one of `keys` minted it for that node."""
    if not MAC_SIZE < len(token) <= MAX_TOKEN:
        raise TokenError("malformed token")
    payload, mac = token[:-MAC_SIZE], token[-MAC_SIZE:]
    if not any(hmac.compare_digest(hmac.new(k, payload, hashlib.sha256).digest()[:MAC_SIZE], mac) for k in keys):
        raise TokenError("unknown token (not issued for this relay)")
    try:
        version, a, b, expires, nonce = _dec.decode(payload)
    except msgspec.DecodeError:
        raise TokenError("malformed token") from None
    if version != TOKEN_VERSION:
        raise TokenError(f"token version {version} is not {TOKEN_VERSION}")
    if expires < now:
        raise TokenError(f"token expired {now - expires:.0f} s ago")
    if node_id not in (a, b):
        raise TokenError(f"token was not issued to node {node_id[:8]}")
    return TokenClaims(a, b, expires, nonce)


class TokenLedger:
    """Which node already used which token: each of the two may present it once, until it expires."""

    def __init__(self) -> None:
        self._used: dict[tuple[bytes, str], float] = {}

    def claim(self, claims: TokenClaims, node_id: str, now: float) -> None:
        self._prune(now)
        key = (claims.nonce, node_id)
        if key in self._used:
            raise TokenError(f"token already used by node {node_id[:8]}")
        self._used[key] = claims.expires

    def _prune(self, now: float) -> None:
        if len(self._used) > 1024 or (self._used and next(iter(self._used.values())) < now):
            self._used = {k: exp for k, exp in self._used.items() if exp >= now}

    def __len__(self) -> int:
        return len(self._used)


def encode_hello(token: bytes, node_id: str) -> bytes:
    if not 0 < len(token) <= MAX_TOKEN or not _NODE_ID_RE.match(node_id):
        raise ValueError("relay hello needs a token of 1..255 bytes and a 32-hex-char node id")
    return RELAY_MAGIC + bytes((RELAY_VERSION, len(token))) + token + node_id.encode()


def parse_hello_fixed(head: bytes) -> int:
    """Check the fixed part of a greeting; returns how many bytes follow (token and node id)."""
    if len(head) != HELLO_FIXED or head[:4] != RELAY_MAGIC:
        raise HelloError("not a relay greeting")
    if head[4] != RELAY_VERSION:
        raise HelloError(f"relay protocol version {head[4]} is not {RELAY_VERSION}")
    if head[5] == 0:
        raise HelloError("empty token")
    return head[5] + NODE_ID_SIZE


def parse_hello_rest(rest: bytes) -> tuple[bytes, str]:
    """(token, node id) from the bytes after the fixed part."""
    token, raw_id = rest[:-NODE_ID_SIZE], rest[-NODE_ID_SIZE:]
    node_id = raw_id.decode("ascii", errors="replace")
    if not _NODE_ID_RE.match(node_id):
        raise HelloError("malformed node id in relay greeting")
    return token, node_id


def encode_reply(status: int, message: str = "") -> bytes:
    msg = message.encode()[:255]
    return bytes((status, len(msg))) + msg
