"""`--encrypt`: TLS 1.3 around every peer stream, bound to the node identities by the p2pd handshake.

TLS gives confidentiality; who is at the other end is still proven by the p2pd handshake (Ed25519
node keys, the join secret's MAC: p2pd.protocol.auth), which runs inside the TLS channel. Neither side
verifies the other's certificate (it is a throwaway self-signed one, made for an ephemeral key at
daemon start). Instead the signed handshake transcript includes the SHA-256 of the TLS server's
certificate as each side saw it (RFC 5929 "tls-server-end-point"; Python's ssl has no TLS exporter):
a man in the middle that terminates TLS shows the dialler its own certificate, the two sides sign
different hashes, and the handshake fails on both ends. docs/security.md "Confidentiality" argues it.

Who is the TLS server: whoever accepts the stream (an incoming TCP connection, the relayed or
punched stream's answering side); on a tcp-punch, where both ends dial, the node named as the
connection's initiator is the client. A node with --encrypt speaks only TLS to peers; one without
it only plaintext: a mixed pair fails its first exchange with a log line naming the cause.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass

import trio

from p2pd.protocol import auth, wire

CERT_VALIDITY = datetime.timedelta(days=3650)  # never checked by a peer: the handshake binds the cert instead
MISMATCH_HINT = "run every node of the cluster with the same --encrypt setting"


def binding_of(cert_der: bytes) -> bytes:
    """The channel binding both ends put in the signed transcript: the TLS server certificate's hash."""
    return hashlib.sha256(b"p2pd tls-server-end-point v1\0" + cert_der).digest()


class PeerTls:
    """This daemon's TLS contexts and ephemeral certificate (made once at start, never written to keep)."""

    def __init__(self, common_name: str) -> None:
        # imported here, with --encrypt only: cryptography's X.509 layer is ~0.1 s of every daemon's start
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pd {common_name[:32]}")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + CERT_VALIDITY)
            .sign(key, hashes.SHA256())
        )
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.binding = binding_of(self.cert_der)
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server.minimum_version = ssl.TLSVersion.TLSv1_3
        # ssl loads a certificate only from a file: a private temporary directory, gone once loaded
        with tempfile.TemporaryDirectory(prefix="p2pd-tls-") as d:
            path = os.path.join(d, "cert.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                f.write(cert.public_bytes(serialization.Encoding.PEM))
            self.server.load_cert_chain(path)
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client.minimum_version = ssl.TLSVersion.TLSv1_3
        self.client.check_hostname = False
        self.client.verify_mode = ssl.CERT_NONE  # the p2pd handshake checks the peer (see the module doc)


@dataclass(frozen=True)
class EncryptedIdentity(auth.Identity):
    """An identity whose peer streams are wrapped in TLS (`p2pd run --encrypt`)."""

    tls: PeerTls


def with_tls(identity: auth.Identity) -> EncryptedIdentity:
    return EncryptedIdentity(identity.key, identity.cluster, PeerTls(identity.node_id))


def tls_of(identity: auth.Identity) -> PeerTls | None:
    return identity.tls if isinstance(identity, EncryptedIdentity) else None


async def wrap(
    stream: trio.abc.Stream, tls: PeerTls, *, server_side: bool, timeout: float
) -> tuple[trio.SSLStream[trio.abc.Stream], bytes]:
    """TLS over `stream` (handshake done) and the channel binding to sign; ProtocolError if the peer
    does not speak TLS 1.3 (a node without --encrypt), TooSlowError past `timeout`."""
    ctx = tls.server if server_side else tls.client
    ssl_stream = trio.SSLStream(stream, ctx, server_side=server_side)
    try:
        with trio.fail_after(timeout):
            await ssl_stream.do_handshake()
    except trio.BrokenResourceError as e:
        cause = e.__cause__ or e
        raise wire.ProtocolError(
            f"TLS handshake failed ({cause}): this node runs with --encrypt and refuses plaintext peers; "
            + MISMATCH_HINT
        ) from None
    if server_side:
        return ssl_stream, tls.binding
    cert = ssl_stream.getpeercert(binary_form=True)
    if not cert:
        raise wire.ProtocolError("TLS peer presented no certificate")
    return ssl_stream, binding_of(cert)
