"""Who published what a node fetches: the publisher's signature, checked by the fetcher itself.

In a secured cluster a node signs every publish with its node key over (name, artifact id, time)
(`p2pd.protocol.auth.publish_transcript`); the tracker keeps the signature with the name and hands
it out with `resolve`. The fetcher does not take the tracker's word for it (`check`):
- a signature that does not verify is an integrity failure, whatever the artifact;
- an env artifact (its code runs on this node when it is unpacked) must be signed, by a publisher
  this node trusts: those given with `p2pd run --trust-publisher NODE_ID`, else those the tracker's
  publishers file lists (sent at registration), else — when neither names any — any member (the
  tracker's ownership rule still keeps one member from moving another's name).
The signed record is kept next to the artifact (`save`/`load`), so a node that gives names back to a
restarted tracker hands over the original publisher's signature, not its own.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from p2pd.errors import ErrorCode
from p2pd.protocol import auth
from p2pd.rpc import RpcError


class Signed(msgspec.Struct, array_like=True, frozen=True):
    name: str
    artifact_id: str
    key: bytes
    signature: bytes
    signed_at: int

    @property
    def publisher(self) -> str:
        return auth.node_id_of(self.key)

    def params(self) -> dict[str, Any]:
        """What `publish` sends to the tracker."""
        return {"key": self.key, "signature": self.signature, "signed_at": self.signed_at}


def sign(key: auth.NodeKey, name: str, artifact_id: str, now: int) -> Signed:
    return Signed(name, artifact_id, key.public, key.sign(auth.publish_transcript(name, artifact_id, now)), now)


def from_reply(name: str, artifact_id: str, reply: dict[str, Any]) -> Signed | None:
    key, sig, at = reply.get("publisher"), reply.get("signature"), reply.get("signed_at")
    if not isinstance(key, bytes) or not isinstance(sig, bytes) or not isinstance(at, int):
        return None
    return Signed(name, artifact_id, key, sig, at)


@dataclass(frozen=True)
class Trust:
    """What this node requires of publishers (secured: a join secret is configured)."""

    secured: bool
    trusted: Collection[str]  # node ids; empty: any member


def check(signed: Signed | None, name: str, artifact_id: str, kind: str, trust: Trust) -> None:
    """Raise RpcError when `name` -> `artifact_id` must not be used here (see the module docstring)."""
    if signed is not None:
        t = auth.publish_transcript(name, artifact_id, signed.signed_at)
        if signed.artifact_id != artifact_id or not auth.verify(signed.key, signed.signature, t):
            raise RpcError(
                ErrorCode.INTEGRITY, f"the publisher's signature of {name} does not verify: refusing {artifact_id[:12]}"
            )
    if not trust.secured or kind != "env":
        return
    if signed is None:
        raise RpcError(
            ErrorCode.UNAUTHORIZED,
            f"env {name} carries no publisher signature: an env runs code on this node, so only a signed one "
            "is unpacked (publish it from a node of this cluster)",
        )
    if trust.trusted and signed.publisher not in trust.trusted:
        raise RpcError(
            ErrorCode.UNAUTHORIZED,
            f"env {name} was published by node {signed.publisher}, which this node does not trust "
            "(trusted: p2pd run --trust-publisher, or the tracker's publishers file)",
        )


def _path(data_dir: Path, name: str) -> Path:
    return data_dir / "provenance" / hashlib.sha256(name.encode()).hexdigest()[:32]


_dec = msgspec.msgpack.Decoder(Signed)


def save(data_dir: Path, signed: Signed) -> None:
    p = _path(data_dir, signed.name)
    p.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.msgpack.encode(signed))
    os.replace(tmp, p)


def load(data_dir: Path, name: str) -> Signed | None:
    try:
        return _dec.decode(_path(data_dir, name).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
