"""Who may point which names at what: publisher scopes, tag ownership, signed publishes (issue #14 row 1).

In a secured cluster every publish is signed by the publishing node's key over (name, artifact id,
time) (`p2pd.protocol.auth.publish_transcript`), and the tracker keeps the signature with the name:
- the node whose key signed the first publish of a name owns it; a publish of that name signed by
  another key is refused (only the owner, or an admin through the admin API, moves it);
- with a publishers file (`p2p-tracker serve --publishers FILE`) only the nodes it lists publish, and
  each only names that start with one of its prefixes; without one every member may publish new names;
- a signed publish older than the one the name points at is refused (a replayed publish);
- `resolve` hands the signature to the fetcher, which verifies it itself and, for an env artifact,
  refuses a publisher it does not trust (p2pd/provenance.py).

The publishers file is JSON: {"publishers": [{"name": "ml-team", "node": "<node id>", "prefixes":
["models/", "envs/"]}]}; `p2pd status` prints a node's id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from p2pd.errors import ErrorCode, P2pdError
from p2pd.protocol import auth

_NODE_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Publisher:
    name: str
    node_id: str
    prefixes: tuple[str, ...]


class Publishers:
    """The tracker's publisher scopes; none configured: every member may publish (and owns what it names first)."""

    def __init__(self, entries: list[Publisher] | None = None) -> None:
        self.entries = list(entries or [])

    @classmethod
    def load(cls, path: Path) -> Publishers:
        try:
            doc = json.loads(path.read_text())
        except OSError as e:
            raise P2pdError(ErrorCode.BAD_REQUEST, f"cannot read the publishers file {path}: {e.strerror}") from None
        except ValueError as e:
            raise P2pdError(ErrorCode.BAD_REQUEST, f"the publishers file {path} is not JSON: {e}") from None
        out: list[Publisher] = []
        items = doc.get("publishers") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise P2pdError(ErrorCode.BAD_REQUEST, f'{path}: expected {{"publishers": [...]}}')
        for i, item in enumerate(items):
            node = item.get("node") if isinstance(item, dict) else None
            prefixes = item.get("prefixes") if isinstance(item, dict) else None
            if not isinstance(node, str) or not _NODE_RE.match(node):
                raise P2pdError(ErrorCode.BAD_REQUEST, f"{path}: publisher {i}: 'node' must be a node id (p2pd status)")
            if not isinstance(prefixes, list) or not prefixes or not all(isinstance(p, str) for p in prefixes):
                raise P2pdError(ErrorCode.BAD_REQUEST, f"{path}: publisher {i}: 'prefixes' must be a list of names")
            out.append(Publisher(str(item.get("name") or node[:8]), node, tuple(prefixes)))
        return cls(out)

    @property
    def node_ids(self) -> list[str]:
        return sorted({e.node_id for e in self.entries})

    def may_publish(self, node_id: str, name: str) -> bool:
        if not self.entries:
            return True
        return any(e.node_id == node_id and name.startswith(e.prefixes) for e in self.entries)


class SignedTag(msgspec.Struct, array_like=True, frozen=True):
    """The signed publish a name points at, as the store keeps it (msgpack)."""

    artifact_id: str
    key: bytes
    signature: bytes
    signed_at: int

    @property
    def owner(self) -> str:
        return auth.node_id_of(self.key)

    def encode(self) -> bytes:
        return _enc.encode(self)

    def reply(self) -> dict[str, Any]:
        """What `resolve` adds, so the fetcher can check the publisher itself."""
        return {"publisher": self.key, "signature": self.signature, "signed_at": self.signed_at}


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(SignedTag)


def decode_signed(blob: bytes) -> SignedTag:
    return _dec.decode(blob)


def check_publish(
    p: dict[str, Any], name: str, artifact_id: str, publishers: Publishers, current: SignedTag | None
) -> SignedTag | None:
    """The signed publish in `p`, if it may move `name`; else a message saying why not (ValueError).

    None: a valid publish that moves nothing (another node seeding the artifact the name already
    points at): accepted, and the owner's signed record stays."""
    key, sig, at = p.get("key"), p.get("signature"), p.get("signed_at")
    if not isinstance(key, bytes) or not isinstance(sig, bytes) or not isinstance(at, int):
        raise ValueError(f"{name}: the publish is not signed (a node of a secured cluster signs what it publishes)")
    if not auth.verify(key, sig, auth.publish_transcript(name, artifact_id, at)):
        raise ValueError(f"{name}: the publisher's signature does not verify")
    owner = auth.node_id_of(key)
    if current is not None and current.owner != owner and current.artifact_id == artifact_id:
        return None  # another seed of what the name points at: nothing moves
    if not publishers.may_publish(owner, name):
        raise ValueError(
            f"node {owner[:8]} may not publish {name}: the tracker's publishers file gives it no prefix of that name"
        )
    if current is not None:
        if current.owner != owner:
            raise ValueError(
                f"{name} belongs to node {current.owner[:8]}, which published it first: only that node, or an "
                "admin (`p2p-tracker admin tag`), can move it; publish under another name"
            )
        if at < current.signed_at and artifact_id != current.artifact_id:
            raise ValueError(f"{name}: this signed publish is older than the one the name points at (a replay?)")
    return SignedTag(artifact_id, key, sig, at)
