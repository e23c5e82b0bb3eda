"""Who is who in a cluster (sans-IO): node keys, self-certifying node ids, the join secret's MACs.

Every node has an Ed25519 key pair; its node id is derived from the public key (`node_id_of`), so an
id cannot be used without the private key and nobody needs a table to check the binding: the peer
handshake and the tracker's registration both verify `node_id == node_id_of(key)` and a signature over
a fresh nonce of the other side. Membership is a separate question with a separate credential: the
cluster's join secret (a file or environment variable given to the tracker and every node). Whoever
proves knowledge of it (an HMAC over the same transcript) is a member; a node outside the cluster can
make a key pair but not that MAC. docs/security.md argues the choice; the byte layouts of every signed
or MACed transcript are in docs/interfaces.md.

Nothing here reads files, clocks or randomness: nonces and ephemeral keys are passed in, so the
handshake and registration rules are unit- and fuzz-tested without sockets.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_SIZE = 32  # Ed25519 and X25519 public keys, raw
SIGNATURE_SIZE = 64
NONCE_SIZE = 16
MEMBER_MAC_SIZE = 32  # HMAC-SHA256 of a transcript under the member key (once per connection: full length)
HEARTBEAT_TAG_SIZE = 16  # keyed BLAKE2s of a UDP heartbeat (every datagram: short, and ~1 µs)
SESSION_KEY_SIZE = 32
MIN_SECRET_BYTES = 16  # a join secret shorter than this is refused (128 bits against guessing)
_ID_DOMAIN = b"p2pd node id v1\0"
_enc = msgspec.msgpack.Encoder()


class AuthError(Exception):
    """A proof did not check out: wrong key for that id, bad signature, not a member, replay."""


def node_id_of(public: bytes) -> str:
    """The node id that belongs to an Ed25519 public key: 128 bits of its SHA-256, as 32 hex digits."""
    return hashlib.sha256(_ID_DOMAIN + public).hexdigest()[:32]


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519 verification that never raises on hostile input (wrong lengths, invalid points)."""
    if len(public) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class NodeKey:
    """A node's Ed25519 private key; its public half names the node (`node_id`)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public: bytes = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.node_id = node_id_of(self.public)

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """The key whose 32-byte private seed this is (what the state dir keeps)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


class ClusterSecret:
    """Keys derived from the cluster's join secret; the secret itself is never sent anywhere.

    Derived keys are domain-separated, so a MAC made for one purpose (a handshake) is never valid for
    another (a registration)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the join secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)}")
        self._member = hmac.digest(secret, b"p2pd member key v1", "sha256")
        self.fingerprint = hashlib.sha256(b"p2pd join secret fingerprint v1\0" + secret).hexdigest()[:16]

    def mac(self, transcript: bytes) -> bytes:
        return hmac.digest(self._member, transcript, "sha256")

    def check(self, transcript: bytes, tag: bytes) -> bool:
        return hmac.compare_digest(self.mac(transcript), tag)


@dataclass(frozen=True)
class Identity:
    """What a node proves with: its key (always) and the join secret (None: an `--insecure` cluster)."""

    key: NodeKey
    cluster: ClusterSecret | None

    @property
    def node_id(self) -> str:
        return self.key.node_id


# ---- the peer handshake --------------------------------------------------------------------------


def handshake_transcript(
    artifact_id: str, signer: str, signer_nonce: bytes, other: str, other_nonce: bytes, channel: bytes = b""
) -> bytes:
    """What a side signs (and MACs) in the peer handshake: both ids, both nonces, the artifact.

    The signer's own id comes first, so a proof reflected back at its author does not verify. Over TLS
    (`--encrypt`) `channel` is the TLS server certificate's hash as this side saw it (p2pd.tls), so a
    proof made inside one TLS channel does not verify inside another (a MITM's); without TLS the
    transcript is the protocol-2 one, byte for byte."""
    if channel:
        return _enc.encode(["p2pd handshake v2 tls", artifact_id, signer, signer_nonce, other, other_nonce, channel])
    return _enc.encode(["p2pd handshake v2", artifact_id, signer, signer_nonce, other, other_nonce])


def handshake_proof(
    me: Identity, artifact_id: str, my_nonce: bytes, other: str, other_nonce: bytes, channel: bytes = b""
) -> tuple[bytes, bytes]:
    """(signature, member MAC) this side sends in its AUTH message; the MAC is empty without a secret."""
    t = handshake_transcript(artifact_id, me.node_id, my_nonce, other, other_nonce, channel)
    return me.key.sign(t), (me.cluster.mac(t) if me.cluster is not None else b"")


def check_hello(node_id: str, key: bytes, nonce: bytes) -> None:
    """A peer's HANDSHAKE names a key that is its id's, and a nonce of the right size."""
    if len(key) != KEY_SIZE or node_id_of(key) != node_id:
        raise AuthError(f"node {node_id[:8]} presented a key that is not its own")
    if len(nonce) != NONCE_SIZE:
        raise AuthError(f"handshake nonce of {len(nonce)} bytes, expected {NONCE_SIZE}")


def check_handshake_proof(
    me: Identity,
    artifact_id: str,
    my_nonce: bytes,
    peer_id: str,
    peer_key: bytes,
    peer_nonce: bytes,
    signature: bytes,
    member: bytes,
    channel: bytes = b"",
) -> None:
    """The peer signed our nonce with the key of the id it claims and, in a secured cluster, knows the secret."""
    t = handshake_transcript(artifact_id, peer_id, peer_nonce, me.node_id, my_nonce, channel)
    if not verify(peer_key, signature, t):
        raise AuthError(
            f"node {peer_id[:8]} did not prove it holds its key"
            + (" over this TLS channel (a man in the middle, or a different TLS endpoint)" if channel else "")
        )
    if me.cluster is not None and not me.cluster.check(t, member):
        raise AuthError(f"node {peer_id[:8]} is not a member of this cluster (no or a different join secret)")


# ---- registration with the tracker ---------------------------------------------------------------


def register_transcript(nonce: bytes, node_id: str, key: bytes, eph: bytes, host: str, port: int) -> bytes:
    """What a node signs and MACs to register: the tracker's nonce, who it is, where, its ephemeral key."""
    return _enc.encode(["p2pd register v1", nonce, node_id, key, eph, host, port])


def register_reply_transcript(request: bytes, tracker_eph: bytes, session: int) -> bytes:
    """What the tracker MACs in its answer, so a node knows its tracker holds the join secret too."""
    return _enc.encode(["p2pd register reply v1", request, tracker_eph, session])


def session_key(private: X25519PrivateKey, peer_public: bytes, nonce: bytes, node_id: str) -> bytes:
    """The key both ends of a registration derive (X25519, then SHA-256 over the context)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # wrong length, or a low-order point (all-zero shared secret)
        raise AuthError(f"bad ephemeral key: {e}") from None
    return hashlib.sha256(b"p2pd session key v1\0" + shared + nonce + node_id.encode()).digest()


def x25519_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def heartbeat_tag(key: bytes, body: bytes) -> bytes:
    """The MAC appended to every authenticated UDP heartbeat (keyed BLAKE2s, 16 bytes)."""
    return hashlib.blake2s(body, key=key, digest_size=HEARTBEAT_TAG_SIZE).digest()


def heartbeat_mac(key: bytes) -> Any:
    """`heartbeat_tag` with the key schedule done once: `mac_with(prepared, body)` copies it per message,
    which halves the tracker's cost per heartbeat (the copy skips keyword parsing and key setup)."""
    return hashlib.blake2s(key=key, digest_size=HEARTBEAT_TAG_SIZE)


def mac_with(prepared: Any, data: bytes) -> bytes:
    h = prepared.copy()
    h.update(data)
    return h.digest()  # type: ignore[no-any-return]


def conn_auth_transcript(nonce: bytes, node_id: str, session: int) -> bytes:
    """What a registered node MACs (session key) to bind a new tracker connection to its session."""
    return _enc.encode(["p2pd connection v1", nonce, node_id, session])


def session_mac(key: bytes, transcript: bytes) -> bytes:
    """A MAC under the session key of something other than a heartbeat (a transcript never decodes as one)."""
    return heartbeat_tag(key, transcript)


# ---- publishing ----------------------------------------------------------------------------------


def publish_transcript(name: str, artifact_id: str, signed_at: int) -> bytes:
    """What a publisher signs: this name points at this artifact, as of this time (seconds, its clock).

    The time orders two signed publishes of one name, so an old signed publish replayed later cannot
    move the tag back."""
    return _enc.encode(["p2pd publish v1", name, artifact_id, signed_at])
