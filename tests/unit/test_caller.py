"""The caller's rights on the control API (p2pd/caller.py), issue #14 row 9: mode-bit checks."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.caller import Caller, R, W, X
from p2pd.errors import ErrorCode, P2pdError

NOBODY = Caller(pid=1, uid=65534, gid=65534, groups=frozenset({65534}))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates files owned by others (run as root)")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A scratch dir every user can reach (pytest's own is 0700 under /tmp/pytest-of-root)."""
    d = Path(tempfile.mkdtemp(prefix="p2pd-caller-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_mode_bits_by_owner_group_other() -> None:
    st = os.stat_result((0o100640, 0, 0, 1, 1000, 50, 0, 0, 0, 0))
    owner = Caller(1, 1000, 1000, frozenset({1000}))
    member = Caller(1, 2000, 2000, frozenset({2000, 50}))
    other = Caller(1, 3000, 3000, frozenset({3000}))
    assert owner.may(st, R | W) and not owner.may(st, X)
    assert member.may(st, R) and not member.may(st, W)
    assert not other.may(st, R)
    assert Caller(1, 0, 0, frozenset()).may(st, R | W | X)  # root


@needs_root
def test_a_file_only_root_may_read_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    secret.chmod(0o600)
    with pytest.raises(P2pdError, match="may not read") as ei:
        NOBODY.check_readable(secret)
    assert ei.value.code is ErrorCode.BAD_REQUEST
    secret.chmod(0o644)
    NOBODY.check_readable(secret)


@needs_root
def test_a_tree_with_one_unreadable_file_or_a_link_to_one_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    tree = tmp_path / "model"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "ok").write_bytes(b"x")
    NOBODY.check_readable(tree)
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    secret.chmod(0o600)
    (tree / "sub" / "link").symlink_to(secret)  # world-readable link, root-only target
    with pytest.raises(P2pdError, match="may not read"):
        NOBODY.check_readable(tree)
    (tree / "sub" / "link").unlink()
    (tree / "sub").chmod(0o700)  # a directory it cannot enter
    with pytest.raises(P2pdError, match="may not"):
        NOBODY.check_readable(tree)


@needs_root
def test_dest_must_be_writable_by_the_caller(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o755)
    with pytest.raises(P2pdError, match="may not write into"):
        NOBODY.check_writable_dest(root_only / "new" / "deeper")
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chown(mine, 65534, 65534)
    NOBODY.check_writable_dest(mine / "new" / "deeper")
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "open").mkdir(mode=0o777)
    with pytest.raises(P2pdError, match="may not reach"):
        NOBODY.check_writable_dest(hidden / "open" / "x")


def test_peer_credentials_of_a_unix_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        c = Caller.of_socket(a)
        assert c is not None and (c.pid, c.uid, c.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert c.privileged
    with socket.socket(socket.AF_INET) as s:
        assert Caller.of_socket(s) is None
