"""Fixtures of the Ray suite; helpers live in ray_testutil.py."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short temp dir (Unix socket paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="p2pray-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def daemon_env(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the client's socket lookup at a socket in `sock_dir`."""
    path = sock_dir / "p2pd.sock"
    monkeypatch.setenv("P2PD_SOCKET", str(path))
    monkeypatch.delenv("P2PD_DATA_DIR", raising=False)
    return path
