"""An unprivileged caller's publish reads only inodes it could read, opened once (p2pd/snapshot.py, #14 row 9).

The attacks swap a path component the caller owns for a symlink between the moment the daemon
looks and the moment it opens: the hooks below make that moment deterministic.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd import snapshot
from p2pd.caller import Caller
from p2pd.errors import ErrorCode, P2pdError
from p2pd.protocol import manifest as mf
from p2pd.storage import StorageError, build_manifest

NOBODY = Caller(pid=1, uid=65534, gid=65534, groups=frozenset({65534}))
SECRET = b"root only " * 100
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates files owned by others (run as root)")


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch dir every user can reach, holding a root-only secret and the daemon's `published` dir."""
    d = Path(tempfile.mkdtemp(prefix="p2pd-snapshot-"))
    d.chmod(0o755)
    vault = d / "vault"
    vault.mkdir(mode=0o700)
    (vault / "w.bin").write_bytes(SECRET)
    (vault / "w.bin").chmod(0o600)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def own_tree(base: Path) -> Path:
    """nobody's model dir: src/a.bin, src/sub/w.bin (same size as the secret), a hard link, a link to a file."""
    home = base / "home"
    src = home / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 3000)
    (src / "sub" / "w.bin").write_bytes(b"w" * len(SECRET))
    os.link(src / "a.bin", src / "hard.bin")
    (src / "blob").symlink_to("sub/w.bin")  # HF caches: snapshot names link to blobs
    (src / "dirlink").symlink_to("sub")  # not followed, as before
    for p in [home, *home.rglob("*")]:
        os.chown(p, 65534, 65534, follow_symlinks=False)
    return src


def published_files(base: Path) -> dict[str, bytes]:
    return {
        p.relative_to(base / "published").as_posix(): p.read_bytes()
        for p in (base / "published").rglob("*")
        if p.is_file()
    }


def test_a_tree_is_linked_by_inode_and_hashes_like_the_source(base: Path) -> None:
    src = own_tree(base)
    tmp, target = snapshot.snapshot_source(NOBODY, src, base / "published")
    assert target == tmp and tmp.parent == base / "published"
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*"))
    assert names == ["a.bin", "blob", "hard.bin", "sub", "sub/w.bin"]
    assert os.stat(tmp / "a.bin").st_ino == os.stat(src / "a.bin").st_ino == os.stat(tmp / "hard.bin").st_ino
    assert os.stat(tmp / "blob").st_ino == os.stat(src / "sub" / "w.bin").st_ino
    assert mf.artifact_id(build_manifest(tmp)[0]) == mf.artifact_id(build_manifest(src)[0])


def test_a_single_file_keeps_its_name(base: Path) -> None:
    src = own_tree(base)
    tmp, target = snapshot.snapshot_source(NOBODY, src / "blob", base / "published")
    assert target == tmp / "blob" and target.read_bytes() == b"w" * len(SECRET)


def test_a_root_only_file_or_a_link_to_one_is_refused(base: Path) -> None:
    src = own_tree(base)
    (src / "sub" / "w.bin").unlink()
    (src / "sub" / "w.bin").symlink_to(base / "vault" / "w.bin")
    with pytest.raises(P2pdError, match="may not") as ei:
        snapshot.snapshot_source(NOBODY, src, base / "published")
    assert ei.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(P2pdError, match="may not"):
        snapshot.snapshot_source(NOBODY, base / "vault" / "w.bin", base / "published")
    assert published_files(base) == {}  # nothing left behind


def test_the_source_swapped_for_a_symlink_after_it_was_resolved_is_refused(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: `realpath` saw nobody's own dir; by the time it is opened, it links to root's."""
    src = own_tree(base)
    real_realpath = os.path.realpath

    def resolve_then_swap(path: str | os.PathLike[str], **kw: bool) -> str:
        out = real_realpath(path, **kw)
        if (src / "sub").is_dir() and not (src / "sub").is_symlink():
            (src / "sub").rename(src / "sub.old")
            (src / "sub").symlink_to(base / "vault")
        return out

    monkeypatch.setattr(snapshot.os.path, "realpath", resolve_then_swap)
    with pytest.raises(StorageError, match="changed while publishing"):
        snapshot.snapshot_source(NOBODY, src / "sub" / "w.bin", base / "published")
    assert published_files(base) == {}


def test_an_entry_swapped_between_lstat_and_open_is_refused(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = own_tree(base)
    real_lstat = snapshot._lstat_at

    def lstat_then_swap(name: str, dir_fd: int, shown: Path) -> os.stat_result:
        st = real_lstat(name, dir_fd, shown)
        if shown == src / "sub":
            (src / "sub").rename(src / "sub.old")
            (src / "sub").symlink_to(base / "vault")
        return st

    monkeypatch.setattr(snapshot, "_lstat_at", lstat_then_swap)
    with pytest.raises(StorageError, match="changed while publishing"):
        snapshot.snapshot_source(NOBODY, src, base / "published")
    assert published_files(base) == {}


def test_what_is_seeded_stays_what_was_checked_after_the_source_is_swapped(base: Path) -> None:
    """Seeding in place read the source path again: swapping `sub` later served root's file."""
    src = own_tree(base)
    tmp, _ = snapshot.snapshot_source(NOBODY, src, base / "published")
    (src / "sub").rename(src / "sub.old")
    (src / "sub").symlink_to(base / "vault")
    assert (tmp / "sub" / "w.bin").read_bytes() == b"w" * len(SECRET)


def test_another_filesystem_gets_a_copy_of_the_checked_bytes(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = own_tree(base)
    (src / "a.bin").chmod(0o755)

    def no_link(*args: object, **kw: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(snapshot.os, "link", no_link)
    tmp, _ = snapshot.snapshot_source(NOBODY, src, base / "published")
    assert os.stat(tmp / "a.bin").st_ino != os.stat(src / "a.bin").st_ino
    assert (tmp / "a.bin").stat().st_mode & 0o777 == 0o555 and (tmp / "sub" / "w.bin").stat().st_mode & 0o777 == 0o444
    assert mf.artifact_id(build_manifest(tmp)[0]) == mf.artifact_id(build_manifest(src)[0])


def test_a_fifo_is_refused_without_blocking(base: Path) -> None:
    src = own_tree(base)
    os.mkfifo(src / "sub" / "pipe")
    with pytest.raises(StorageError, match="not a regular file"):
        snapshot.snapshot_source(NOBODY, src, base / "published")


def test_adopt_and_cleanup_of_leftovers(base: Path) -> None:
    src = own_tree(base)
    published = base / "published"
    tmp, _ = snapshot.snapshot_source(NOBODY, src, published)
    final = snapshot.adopt(tmp, published, "ab" * 16)
    assert final == published / ("ab" * 16) and (final / "a.bin").exists() and not tmp.exists()
    again, _ = snapshot.snapshot_source(NOBODY, src, published)
    (final / "a.bin").unlink()
    assert snapshot.adopt(again, published, "ab" * 16) == final and not again.exists()
    assert not (final / "a.bin").exists()  # the one there stays (a swarm may be reading it)
    leftover, _ = snapshot.snapshot_source(NOBODY, src, published)
    (published / ("cd" * 16)).mkdir()  # a publish whose record was never written
    gone = snapshot.cleanup_stale(published, {"ab" * 16})
    assert sorted(gone) == sorted([leftover, published / ("cd" * 16)])
    assert [p.name for p in published.iterdir()] == ["ab" * 16]


def test_a_full_disk_during_a_copy_is_said_plainly(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = own_tree(base)

    def no_link(*args: object, **kw: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshot.os, "link", no_link)
    monkeypatch.setattr(snapshot.os, "write", full)
    with pytest.raises(StorageError, match="disk full copying") as ei:
        snapshot.snapshot_source(NOBODY, src, base / "published")
    assert ei.value.code is ErrorCode.DISK_FULL
    monkeypatch.undo()
    assert published_files(base) == {}
