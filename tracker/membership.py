"""Who may talk to the tracker: registration proofs, and which node each TCP connection speaks for.

A secured tracker (one given the cluster's join secret) trusts a TCP connection only for the nodes
that proved themselves on it:
- `challenge` hands the connection a fresh nonce (kept with the connection, so tracker replicas need
  no shared state for it);
- `register` carries the node's public key, an ephemeral X25519 key, an Ed25519 signature and a
  join-secret MAC over (nonce, node id, key, ephemeral key, address). The id must be the key's
  (`p2pd.protocol.auth.node_id_of`), so nobody registers another node's id; the tracker answers with
  its own ephemeral key and a MAC proving it holds the secret too. Both ends derive the session key;
- `auth` binds a later connection of a registered node to its session (a MAC under the session key
  over the new connection's nonce), so a node that reconnects needs no new registration.
Heartbeats and leaves over TCP are accepted only for a node bound to that connection; UDP heartbeats
carry a MAC under the session key (tracker/server.py). Anything else (a spoofed heartbeat, leave or
register for another node) is refused and logged with the address it came from.

An `--insecure` tracker has no `Membership`: every call is accepted as before (docs/security.md).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pd.errors import ErrorCode
from p2pd.protocol import auth
from tracker.validate import TrackerError

log = logging.getLogger("tracker.membership")

MAX_BOUND_NODES = 64  # nodes one connection may speak for (a daemon: 1; a load generator: many, recent ones kept)
WARN_EVERY = 10.0  # seconds between two warnings about refused proofs of the same kind


def unauthorized(message: str) -> TrackerError:
    return TrackerError(ErrorCode.UNAUTHORIZED, message)


@dataclass
class ConnState:
    """What one TCP connection has proved: its nonce, and the nodes it registered or authenticated."""

    peer: str
    nonce: bytes | None = None
    nodes: dict[str, None] = field(default_factory=dict)  # insertion-ordered set

    def bind(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        self.nodes[node_id] = None
        while len(self.nodes) > MAX_BOUND_NODES:
            del self.nodes[next(iter(self.nodes))]

    @property
    def member(self) -> bool:
        return bool(self.nodes)


@dataclass(frozen=True)
class Proof:
    """A registration that checked out: what the store keeps, and what the reply adds."""

    key: bytes
    session_key: bytes
    reply: dict[str, Any]
    transcript: bytes


class Membership:
    """The join-secret checks of one tracker process."""

    def __init__(self, cluster: auth.ClusterSecret) -> None:
        self.cluster = cluster
        self.refused = 0
        self._warned: dict[str, float] = {}

    def refuse(self, kind: str, message: str) -> TrackerError:
        """Count and log (at most once per WARN_EVERY per kind) a refused proof; the error to raise."""
        self.refused += 1
        now = time.monotonic()
        if now - self._warned.get(kind, -WARN_EVERY) >= WARN_EVERY:
            self._warned[kind] = now
            log.warning("refused %s: %s", kind, message)
        return unauthorized(message)

    def challenge(self, conn: ConnState) -> bytes:
        conn.nonce = os.urandom(auth.NONCE_SIZE)
        return conn.nonce

    def check_register(self, conn: ConnState, p: dict[str, Any], node_id: str, host: str, port: int) -> Proof:
        """Verify a registration's proofs; raises UNAUTHORIZED (logged) when one fails."""
        if conn.nonce is None:
            raise self.refuse(
                "registration",
                f"{node_id[:8]} from {conn.peer}: no proof of membership: this tracker runs a secured cluster, "
                "give the node its join secret (docs/security.md)",
            )
        key, eph, sig, member = (p.get(k) for k in ("key", "eph", "proof", "member"))
        if not all(isinstance(v, bytes) for v in (key, eph, sig, member)):
            raise self.refuse(
                "registration", f"{node_id[:8]} from {conn.peer}: no key proof (is the node run without a join secret?)"
            )
        assert isinstance(key, bytes) and isinstance(eph, bytes) and isinstance(sig, bytes)
        assert isinstance(member, bytes)
        if len(key) != auth.KEY_SIZE or auth.node_id_of(key) != node_id:
            raise self.refuse("registration", f"{node_id[:8]} from {conn.peer}: the key is not that node id's")
        t = auth.register_transcript(conn.nonce, node_id, key, eph, host, port)
        if not self.cluster.check(t, member):
            raise self.refuse(
                "registration", f"{node_id[:8]} from {conn.peer}: not a member of this cluster (wrong join secret)"
            )
        if not auth.verify(key, sig, t):
            raise self.refuse("registration", f"{node_id[:8]} from {conn.peer}: bad signature")
        mine = X25519PrivateKey.generate()
        try:
            skey = auth.session_key(mine, eph, conn.nonce, node_id)
        except auth.AuthError as e:
            raise self.refuse("registration", f"{node_id[:8]} from {conn.peer}: {e}") from None
        return Proof(key, skey, {"eph": auth.x25519_public(mine)}, t)

    def reply_mac(self, proof: Proof, session: int) -> bytes:
        return self.cluster.mac(auth.register_reply_transcript(proof.transcript, proof.reply["eph"], session))

    def check_auth(self, conn: ConnState, p: dict[str, Any], node_id: str, session_key: Any) -> bool:
        """A registered node binds this connection to its session; False: unknown node or session (register)."""
        if conn.nonce is None:
            raise unauthorized("auth without a challenge: call `challenge` on this connection first")
        session, mac = p.get("session"), p.get("mac")
        if session_key is None or not isinstance(session, int) or not isinstance(mac, bytes):
            return False
        want = auth.mac_with(session_key, auth.conn_auth_transcript(conn.nonce, node_id, session))
        if not hmac.compare_digest(want, mac):
            raise self.refuse("connection auth", f"{node_id[:8]} from {conn.peer}: wrong session MAC")
        conn.bind(node_id)
        return True

    def require_bound(self, conn: ConnState, node_id: str, what: str, registered: bool) -> None:
        """`what` (heartbeat, leave) for node_id is accepted only from a connection that proved that node."""
        if node_id in conn.nodes:
            return
        if registered:
            raise self.refuse(what, f"{what} for node {node_id[:8]} from {conn.peer}, which did not prove that node")
        raise unauthorized(f"{what} for node {node_id[:8]}: this connection did not register it")

    def require_member(self, conn: ConnState, what: str) -> None:
        if not conn.member:
            raise self.refuse(what, f"{what} from {conn.peer}: only registered cluster members may ask")
