"""What an unprivileged caller publishes: the files it could read, pinned by inode (issue #14 row 9).

The daemon (often root) checks a caller's rights itself (p2pd/caller.py). Checking a path and then
reading it by path again leaves a gap: a caller who owns a directory on the way can swap a
component for a symlink in between, or at any time later while the node seeds the files in place,
and have the daemon read (and send to peers) a file the caller may not read.

So for such a caller nothing is read by path after the check. Every component is opened with
O_NOFOLLOW relative to its parent's fd (a symlink where none was, or a different inode than the one
looked at, refuses the publish), the caller's rights are checked on the open fds (fstat: the inode
that will be read, not a name), and each checked file is hard-linked from its fd into
`<data dir>/published/<artifact id>/`, which only the daemon may write. Hashing and seeding read
those links: no name there can be swapped, and each is the inode that was checked.

Why links and not fds kept open: a seeding node must not hold one fd per file (an artifact may
have 100,000 files; PieceStore keeps at most 64 open), a walk holds only one fd per directory
level, and links survive a restart. Where a link cannot be made (the source is on another
filesystem than the data dir, or protected_hardlinks refuses a non-root daemon) the checked fd's
bytes are copied instead: correct, at the cost of the disk space and the time of a copy.
The caller still owns a linked inode and may rewrite its bytes: peers then get pieces that fail
their digests (what seeding a modified file in place always did), never another file's bytes.
Root and the daemon's own user may read anything the daemon may: their publishes skip all this and
are seeded in place, as before.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from p2pd.caller import Caller, R, X
from p2pd.errors import ErrorCode
from p2pd.protocol import manifest as mf
from p2pd.storage import READ_CHUNK, StorageError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"  # a snapshot being built; left over only by a crash (cleanup_stale removes it)
_REACH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # search only: no read right needed
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a fifo swapped in cannot hang us
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOENT)  # then copy (ENOENT: /proc absent or unlinked)


def snapshot_source(caller: Caller, path: Path, published: Path) -> tuple[Path, Path]:
    """Link what `caller` may read at `path` into a new temp dir under `published`.

    Returns (temp dir, what to hash: the temp dir, or the file in it for a single file). The temp
    dir is removed if anything fails; `adopt` gives it its final name once the artifact id is known.
    """
    published.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=published))
    try:
        tmp.chmod(0o755)  # as readable as cache/<id>: a fetch on this node returns a path in it
        out = os.open(tmp, _DIR)
        try:
            fd, st = open_checked(caller, path)
            try:
                if stat.S_ISDIR(st.st_mode):
                    caller.require(st, R | X, path, "read")
                    real = os.path.realpath(path)
                    copied = _link_tree(caller, fd, real, path, out)
                    target = tmp
                else:
                    mf.validate_path(path.name)
                    caller.require(st, R, path, "read")
                    copied = _place(fd, st, out, path.name)
                    target = tmp / path.name
            finally:
                os.close(fd)
        finally:
            os.close(out)
        if copied:
            log.info("publish of %s: %d bytes copied into %s (not on the data dir's filesystem)", path, copied, tmp)
        return tmp, target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adopt(tmp: Path, published: Path, artifact_id: str) -> Path:
    """Give a snapshot its final name `published/<id>`, unless one is there (the same bytes: the same id).

    Keeping the one there, not replacing it, lets two publishes of the same files race safely: the
    first one's swarm may already read from it.
    """
    final = published / artifact_id
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(tmp)
    return final


def cleanup_stale(published: Path, keep: set[str]) -> list[Path]:
    """Remove snapshots a crash left: temp dirs, and dirs whose artifact has no record. Call at start."""
    gone: list[Path] = []
    if not published.is_dir():
        return gone
    for p in published.iterdir():
        if p.name.startswith(TMP_PREFIX) or p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def open_checked(caller: Caller, path: Path | str) -> tuple[int, os.stat_result]:
    """Open `path` as `caller` could reach it, following no link on the way; (fd, its fstat).

    The resolved path (`realpath`) is only a plan: each of its components is opened without
    following links and must still be what the plan said; each directory passed must let the
    caller search it. The last component may be a directory (opened for listing) or a file.
    """
    shown = Path(path)
    parts = [p for p in os.path.realpath(path).split("/") if p]
    fd = os.open("/", _REACH if parts else _DIR)
    try:
        for i, part in enumerate(parts):
            caller.require(os.fstat(fd), X, shown, "reach")
            if i < len(parts) - 1:
                nxt = _open_at(part, _REACH, fd, shown)
                os.close(fd)
                fd = nxt
                continue
            st = _lstat_at(part, fd, shown)
            nxt, _ = _open_entry(part, st, fd, shown)
            os.close(fd)
            fd = nxt
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _link_tree(caller: Caller, dir_fd: int, real: str, shown: Path, out_fd: int) -> int:
    """Link every file under `dir_fd` the caller may read into `out_fd`; bytes copied instead of linked.

    Like scan_source: symlinks to files are followed (HF caches link snapshots to blobs), to
    directories are not, and anything else that is not a regular file refuses the publish.
    """
    copied = 0
    for name in sorted(os.listdir(dir_fd)):
        where = shown / name
        st = _lstat_at(name, dir_fd, where)
        if stat.S_ISLNK(st.st_mode):
            target = os.path.join(real, os.readlink(name, dir_fd=dir_fd))
            try:
                fd, fst = open_checked(caller, target)
            except StorageError as e:
                raise StorageError(f"{where} is a symlink to {target}: {e.message}", e.code) from None
            try:
                if stat.S_ISDIR(fst.st_mode):
                    continue  # not followed, as os.walk does not
                caller.require(fst, R, where, "read")
                copied += _place(fd, fst, out_fd, name)
            finally:
                os.close(fd)
            continue
        fd, fst = _open_entry(name, st, dir_fd, where)
        try:
            if stat.S_ISDIR(fst.st_mode):
                caller.require(fst, R | X, where, "read")
                os.mkdir(name, 0o755, dir_fd=out_fd)
                sub_out = os.open(name, _DIR, dir_fd=out_fd)
                try:
                    copied += _link_tree(caller, fd, os.path.join(real, name), where, sub_out)
                finally:
                    os.close(sub_out)
            else:
                caller.require(fst, R, where, "read")
                copied += _place(fd, fst, out_fd, name)
        finally:
            os.close(fd)
    return copied


def _open_entry(name: str, st: os.stat_result, dir_fd: int, shown: Path) -> tuple[int, os.stat_result]:
    """Open the directory or regular file `name` that lstat showed as `st`; it must still be that inode."""
    if stat.S_ISLNK(st.st_mode):
        raise _changed(shown)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise StorageError(
            f"{shown} is not a regular file or directory (device, socket or fifo): remove it from the artifact",
            ErrorCode.BAD_REQUEST,
        )
    fd = _open_at(name, _DIR if stat.S_ISDIR(st.st_mode) else _FILE, dir_fd, shown)
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino, stat.S_IFMT(fst.st_mode)) != (st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)):
        os.close(fd)
        raise _changed(shown)
    return fd, fst


def _place(fd: int, st: os.stat_result, out_fd: int, name: str) -> int:
    """Hard-link the open file as `name` in `out_fd`; else copy its bytes. Returns the bytes copied."""
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=out_fd, follow_symlinks=True)
        return 0
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    mode = 0o555 if st.st_mode & 0o111 else 0o444
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=out_fd)
    copied = 0
    try:
        while chunk := os.read(fd, READ_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
            copied += len(chunk)
        os.fchmod(out, mode)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StorageError(
                f"disk full copying {name} into the data dir (the source is on another filesystem): "
                "free space, or publish from the data dir's filesystem",
                ErrorCode.DISK_FULL,
            ) from e
        raise
    finally:
        os.close(out)
    return copied


def _open_at(name: str, flags: int, dir_fd: int, shown: Path) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise StorageError(f"{shown} does not exist (or was removed while publishing)", ErrorCode.BAD_REQUEST) from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _changed(shown) from None
        raise


def _lstat_at(name: str, dir_fd: int, shown: Path) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise StorageError(f"{shown} does not exist (or was removed while publishing)", ErrorCode.BAD_REQUEST) from None


def _changed(shown: Path) -> StorageError:
    return StorageError(
        f"{shown} changed while publishing (a path component became a symlink or another file): "
        "publish again once nothing modifies it",
        ErrorCode.BAD_REQUEST,
    )
