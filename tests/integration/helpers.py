"""Checks the integration tests share; the processes themselves come from `p2pd.cluster`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import trio


def sha256_tree(root: Path) -> dict[str, str]:
    """Digest of every file under root (or of root itself when it is a file), with hashlib: a check
    independent of p2pd's own xxh3 verification."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = {}
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        out[p.name if root.is_file() else p.relative_to(root).as_posix()] = h.hexdigest()
    return out


async def wait_until(pred: Any, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll the async predicate until it returns something true (returned); AssertionError naming `what`
    after `timeout` seconds."""
    with trio.move_on_after(timeout):
        while True:
            v = await pred()
            if v:
                return v
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def member_identity(cluster: Any) -> Any:
    """A fresh node identity of this (secured) LocalCluster: its join secret, a key of its own."""
    import os

    from p2pd.protocol.auth import ClusterSecret, Identity, NodeKey

    assert cluster.join_secret_file is not None, "the cluster runs --insecure"
    return Identity(NodeKey.from_seed(os.urandom(32)), ClusterSecret(cluster.join_secret_file.read_bytes().strip()))
