"""Piece storage on disk: hashing for publish, staging with preallocated files, resume journal, cache.

Data dir layout (one daemon per data dir):
    node_id                      this node's id (random, persistent)
    artifacts/<id>.manifest      canonical manifest bytes
    artifacts/<id>.json          record {name, root, published}; written LAST, atomically: its
                                 existence is what "complete and verified" means
    staging/<id>/...             files of a download in progress, preallocated at final size
    staging/<id>.journal         bitfield of verified pieces (resume after a crash or restart)
    staging/<id>.name.json       {"name"} the download was asked for (shown again when it resumes)
    cache/<id>/...               completed downloads (files read-only)
    published/<id>/...           hard links to (or copies of) the files an unprivileged caller
                                 published, checked by inode (p2pd/snapshot.py); seeded from here
    envs/<id>/                   unpacked environments (p2pd/envpack.py)

Pieces are written with pwrite at their offsets and never buffered beyond one piece. A piece is
marked in the journal only after its bytes were written and its digest matched; on resume the
marked pieces are verified again, so a torn write can cost a re-fetch but never a wrong byte.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from p2pd.errors import ErrorCode, P2pdError
from p2pd.protocol import bitfield as bits
from p2pd.protocol import manifest as mf
from p2pd.protocol.wire import bitfield_bytes as bitfield_len

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
READ_CHUNK = 8 << 20
JOURNAL_MAGIC = b"P2PDJRN1"
STAGED_NAME_SUFFIX = ".name.json"


MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (longest mount point in /proc/self/mounts), or ""."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [fields[1:3] for fields in map(str.split, f) if len(fields) >= 3]
    except OSError:
        return ""
    target = os.path.realpath(path)
    best, fstype = "", ""
    for mnt, typ in mounts:
        mnt = mnt.replace("\\040", " ")
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, typ
    return fstype


class StorageError(P2pdError):
    """A storage failure the user must act on; its code says which (DISK_FULL, STORAGE, BAD_REQUEST).

    The code is set where the failure is detected (ENOSPC, a too-small disk, an unusable source path)
    so callers pass it on instead of guessing from the message.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.STORAGE) -> None:
        super().__init__(code, message)


def piece_digest(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


# --------------------------------------------------------------------------- publishing (hashing)
def scan_source(path: Path) -> tuple[list[mf.FileEntry], Path, bool]:
    """List an artifact's files: (entries, root dir, single_file). Symlinks to files are followed."""
    if not path.exists():
        raise StorageError(f"{path} does not exist", ErrorCode.BAD_REQUEST)
    if path.is_file():
        st = path.stat()
        return [mf.FileEntry(path.name, st.st_size, bool(st.st_mode & 0o111))], path.parent, True
    if not path.is_dir():
        raise StorageError(f"{path} is neither a regular file nor a directory", ErrorCode.BAD_REQUEST)
    entries: list[mf.FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            st = full.stat()  # follows symlinks (HF caches link snapshots to blobs)
            rel = full.relative_to(path).as_posix()
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(
                    f"{full} is not a regular file (device, socket or fifo): remove it from the artifact",
                    ErrorCode.BAD_REQUEST,
                )
            mf.validate_path(rel)
            entries.append(mf.FileEntry(rel, st.st_size, bool(st.st_mode & 0o111)))
    if not entries:
        raise StorageError(f"{path} contains no files", ErrorCode.BAD_REQUEST)
    return entries, path, False


def hash_pieces(root: Path, files: list[mf.FileEntry], piece_size: int, progress: Progress | None = None) -> bytes:
    """Stream every file once in large reads; digest each piece across file boundaries."""
    total = sum(f.size for f in sorted(files, key=lambda f: f.path))
    out = bytearray()
    buf = bytearray(piece_size)
    view = memoryview(buf)
    fill = 0
    done = 0
    for f in sorted(files, key=lambda f: f.path):
        with open(root / f.path, "rb", buffering=0) as fh:
            remaining = f.size
            while remaining:
                n = fh.readinto(view[fill : fill + min(piece_size - fill, remaining)])
                if not n:
                    raise StorageError(
                        f"{root / f.path} shrank while hashing: is something writing to it?", ErrorCode.BAD_REQUEST
                    )
                fill += n
                remaining -= n
                done += n
                if fill == piece_size:
                    out += piece_digest(view)
                    fill = 0
                    if progress:
                        progress(done, total)
    if fill:
        out += piece_digest(view[:fill])
    if progress:
        progress(done, total)
    return bytes(out)


def build_manifest(
    path: Path, *, kind: str = "files", meta: dict[str, str] | None = None, progress: Progress | None = None
) -> tuple[mf.Manifest, Path]:
    files, root, single = scan_source(path)
    size = sum(f.size for f in files)
    piece_size = mf.choose_piece_size(size)
    digests = hash_pieces(root, files, piece_size, progress)
    return mf.build(files, piece_size, digests, kind=kind, single_file=single, meta=meta), root


# --------------------------------------------------------------------------- journal
class Journal:
    """Bitfield of verified pieces, rewritten in place (one small pwrite per verified piece)."""

    def __init__(self, path: Path, artifact_id: str, num_pieces: int) -> None:
        self.path = path
        self.num_pieces = num_pieces
        self._header = JOURNAL_MAGIC + bytes.fromhex(artifact_id)
        self._fd = -1

    def load(self) -> int:
        """Return the recorded piece mask (piece space), or 0 if absent or not ours."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        if not data.startswith(self._header) or len(data) != len(self._header) + bitfield_len(self.num_pieces):
            return 0
        return bits.from_bytes(data[len(self._header) :], self.num_pieces)

    def open(self, mask: int) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(self._fd, self._header + bits.to_bytes(mask, self.num_pieces), 0)

    def record(self, mask: int) -> None:
        os.pwrite(self._fd, bits.to_bytes(mask, self.num_pieces), len(self._header))

    def close(self, delete: bool = False) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- piece store
MAX_OPEN_FILES = 64  # per store: pieces in flight touch a few files each; a 100,000-file artifact must fit 1,024 fds


class PieceStore:
    """Random-access piece I/O over an artifact's files (staging for downloads, any root for seeding).

    Files are opened on first use and kept in an LRU of at most `max_open` descriptors, so an
    artifact of 100,000 small files works under `ulimit -n 1024` and a seeding node does not hold
    one descriptor per file it ever served. A descriptor handed out (`pinned_spans`, for sendfile
    across awaits, or a worker thread's read or write) is pinned: it is not closed, and its number
    cannot be reused for another file, until it is released; the LRU may then run over its bound by
    the pinned ones for a moment. The lock makes the LRU safe to use from worker threads.
    """

    def __init__(self, manifest: mf.Manifest, root: Path, *, writable: bool, max_open: int = MAX_OPEN_FILES) -> None:
        self.manifest = manifest
        self.layout = mf.Layout(manifest)
        self.root = root
        self.writable = writable
        self.max_open = max(1, max_open)
        self._open: collections.OrderedDict[int, int] = collections.OrderedDict()  # file index -> fd, oldest first
        self._pins: dict[int, int] = {}  # file index -> holders of its fd
        self._dirty: set[int] = set()  # written since the last sync (fsync reaches them through any fd)
        self._lock = threading.Lock()
        self._closed = False  # closed: still usable, but keeps no file open between uses

    @property
    def open_files(self) -> int:
        return len(self._open)

    def preallocate(self) -> None:
        """Create every file at its final size; raise StorageError early when the disk is too small.

        On a disk, blocks are reserved (fallocate) so a full disk shows up now and files do not
        fragment. On a memory-backed filesystem (tmpfs) reserving means zero-filling every page
        before the download overwrites it: 0.2 s per GiB on the fetch's critical path for nothing,
        so there the files are only sized; the free-space check above and the ENOSPC handling in
        write_piece still turn a full filesystem into a clear error.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        need = 0
        for f in self.manifest.files:
            p = self.root / f.path
            have = p.stat().st_size if p.exists() else 0
            need += max(0, f.size - have)
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise StorageError(
                f"not enough disk space in {self.root}: need {need / 1e9:.2f} GB more, {free / 1e9:.2f} GB free; "
                "free space or point --data-dir at a larger disk",
                ErrorCode.DISK_FULL,
            )
        reserve = filesystem_type(self.root) not in MEMORY_FILESYSTEMS
        for i, f in enumerate(self.manifest.files):
            p = self.root / f.path
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = self._acquire(i, create=True)
            try:
                if f.size and reserve:
                    try:
                        os.posix_fallocate(fd, 0, f.size)
                        continue
                    except OSError as e:
                        if e.errno == errno.ENOSPC:
                            raise StorageError(
                                f"disk full while preallocating {p}: free space and fetch again", ErrorCode.DISK_FULL
                            ) from e
                        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                os.ftruncate(fd, f.size)
            finally:
                self._release(i)

    # -- the LRU of open files ---------------------------------------------------------------------
    def _acquire(self, i: int, *, create: bool = False) -> int:
        """The fd of file `i`, opened if needed and pinned until `_release(i)`."""
        with self._lock:
            fd = self._open.get(i)
            if fd is not None:
                self._open.move_to_end(i)
                self._pins[i] = self._pins.get(i, 0) + 1
                return fd
        # open outside the lock (a slow filesystem must not hold up other files' users)
        flags = (os.O_RDWR | (os.O_CREAT if create else 0)) if self.writable else os.O_RDONLY
        try:
            new = os.open(self.root / self.manifest.files[i].path, flags | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise StorageError(
                    f"out of file descriptors opening a file under {self.root}: raise `ulimit -n`"
                ) from e
            raise
        with self._lock:
            fd = self._open.get(i)
            if fd is not None:  # another thread opened it meanwhile: keep one
                os.close(new)
                self._open.move_to_end(i)
            else:
                fd = self._open[i] = new
            self._pins[i] = self._pins.get(i, 0) + 1
            self._evict_locked()
            return fd

    def _release(self, i: int) -> None:
        with self._lock:
            left = self._pins.get(i, 0) - 1
            if left > 0:
                self._pins[i] = left
            else:
                self._pins.pop(i, None)
            self._evict_locked()

    def _evict_locked(self) -> None:
        """Close the least recently used unpinned files until at most `max_open` are open."""
        over = len(self._open) - (0 if self._closed else self.max_open)
        if over <= 0:
            return
        for i in list(self._open):
            if over <= 0:
                break
            if i in self._pins:
                continue
            os.close(self._open.pop(i))
            over -= 1

    @contextlib.contextmanager
    def pinned_spans(self, index: int) -> Iterator[list[tuple[int, int, int]]]:
        """(fd, file offset, length) per file segment of a piece, for sendfile: valid inside the block."""
        spans = self.layout.piece_spans(index)
        taken: list[int] = []
        try:
            out = []
            for i, off, n in spans:
                out.append((self._acquire(i), off, n))
                taken.append(i)
            yield out
        finally:
            for i in taken:
                self._release(i)

    def pread(self, file_index: int, n: int, offset: int) -> bytes:
        """Up to `n` bytes of one file at `offset` (a sample of it, say)."""
        fd = self._acquire(file_index)
        try:
            return os.pread(fd, n, offset)
        finally:
            self._release(file_index)

    def sendfile_fits(self, index: int) -> bool:
        """Can the piece's files all be pinned at once for sendfile (else send it from memory)?

        A 256 KiB piece of an artifact of one-byte files spans thousands of files: pinning them all
        would take as many fds as the old store did.
        """
        return len(self.layout.piece_spans(index)) <= max(1, self.max_open // 2)

    def read_piece(self, index: int) -> bytearray:
        """The piece's bytes, reading one file at a time (holds one fd at a time, whatever the piece spans)."""
        buf = bytearray(self.manifest.piece_length(index))
        view = memoryview(buf)
        pos = 0
        for fi, off, n in self.layout.piece_spans(index):
            fd = self._acquire(fi)
            try:
                got = os.preadv(fd, [view[pos : pos + n]], off)
            finally:
                self._release(fi)
            if got != n:
                raise StorageError(f"short read of piece {index}: file truncated under {self.root}?")
            pos += n
        return buf

    def verify(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        return piece_digest(data) == self.manifest.digest(index)

    def write_piece(self, index: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos = 0
        for fi, off, n in self.layout.piece_spans(index):
            self._dirty.add(fi)
            fd = self._acquire(fi)
            try:
                while n:
                    try:
                        w = os.pwrite(fd, view[pos : pos + n], off)
                    except OSError as e:
                        if e.errno == errno.ENOSPC:
                            raise StorageError(
                                f"disk full writing under {self.root}: free space; the download resumes",
                                ErrorCode.DISK_FULL,
                            ) from e
                        raise
                    pos += w
                    off += w
                    n -= w
            finally:
                self._release(fi)

    def verify_existing(self, mask: int) -> int:
        """Re-verify the pieces in `mask` from disk (resume); return the mask of those that match."""
        ok = 0
        for i in bits.indices(mask):
            if i < self.manifest.num_pieces and self.verify(i, self.read_piece(i)):
                ok |= 1 << i
        return ok

    def sync(self) -> None:
        """fsync every file written since the last sync (through a fresh fd if its own was evicted:
        fsync flushes the file's dirty pages whichever descriptor wrote them)."""
        for i in sorted(self._dirty):
            fd = self._acquire(i)
            try:
                os.fsync(fd)
            finally:
                self._release(i)
        self._dirty.clear()

    def close(self) -> None:
        """Close every open file not pinned right now (a pinned one closes when its holder releases it).

        Idempotent; a closed store still answers (each use opens and closes its files), so a late
        worker thread of a stopped download fails or finishes cleanly instead of using a stale fd.
        """
        with self._lock:
            for i in list(self._open):
                if i not in self._pins:
                    os.close(self._open.pop(i))
            self._closed = True


# --------------------------------------------------------------------------- catalog
@dataclass
class Record:
    artifact_id: str
    name: str
    root: Path
    published: bool
    manifest: mf.Manifest

    @property
    def path(self) -> Path:
        """What a user gets: the file of a single-file artifact, else the directory."""
        return self.root / self.manifest.files[0].path if self.manifest.single_file else self.root


class Catalog:
    """The data dir's artifacts: complete ones (records), downloads in progress (staging)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.artifacts = data_dir / "artifacts"
        self.staging = data_dir / "staging"
        self.cache = data_dir / "cache"
        self.published = data_dir / "published"
        for d in (self.artifacts, self.staging, self.cache):
            d.mkdir(parents=True, exist_ok=True)

    def node_id(self) -> str:
        p = self.data_dir / "node_id"
        try:
            nid = p.read_text().strip()
            if len(nid) == 32 and all(c in "0123456789abcdef" for c in nid):
                return nid
        except FileNotFoundError:
            pass
        nid = os.urandom(16).hex()
        atomic_write(p, nid.encode())
        return nid

    def save_manifest(self, artifact_id: str, m: mf.Manifest) -> None:
        p = self.artifacts / f"{artifact_id}.manifest"
        if not p.exists():
            atomic_write(p, mf.encode(m))

    def load_manifest(self, artifact_id: str) -> mf.Manifest | None:
        try:
            return mf.decode_checked((self.artifacts / f"{artifact_id}.manifest").read_bytes(), artifact_id)
        except FileNotFoundError:
            return None

    def mark_complete(self, artifact_id: str, name: str, root: Path, published: bool) -> None:
        rec = {"name": name, "root": str(root), "published": published}
        atomic_write(self.artifacts / f"{artifact_id}.json", json.dumps(rec).encode())

    def forget(self, artifact_id: str) -> None:
        (self.artifacts / f"{artifact_id}.json").unlink(missing_ok=True)

    def complete_records(self) -> list[Record]:
        out = []
        for p in sorted(self.artifacts.glob("*.json")):
            aid = p.stem
            try:
                m = self.load_manifest(aid)
                rec = json.loads(p.read_text())
            except (mf.ManifestError, ValueError, OSError) as e:
                log.error("ignoring damaged record %s: %s (delete it to silence this)", p, e)
                continue
            if m is None:
                continue
            out.append(Record(aid, rec.get("name", ""), Path(rec["root"]), bool(rec.get("published")), m))
        return out

    def staged_ids(self) -> list[str]:
        """Downloads to resume: those with a journal. Called at start, under the data-dir lock.

        A name file without its journal belongs to no download (a crash between finalize's two
        unlinks, before the journal was first written, or a version that never removed them): it is
        deleted here.
        """
        ids = {p.name[: -len(".journal")] for p in self.staging.glob("*.journal")}
        for p in self.staging.glob("*" + STAGED_NAME_SUFFIX):
            if p.name[: -len(STAGED_NAME_SUFFIX)] not in ids:
                p.unlink(missing_ok=True)
        return sorted(ids)

    def save_staged_name(self, artifact_id: str, name: str) -> None:
        """Remember the name a download was asked for, so it shows again when the download resumes."""
        atomic_write(self._staged_name_path(artifact_id), json.dumps({"name": name}).encode())

    def staged_name(self, artifact_id: str) -> str | None:
        """The name saved for a download in progress, or None (never saved, or damaged)."""
        try:
            return str(json.loads(self._staged_name_path(artifact_id).read_bytes())["name"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def _staged_name_path(self, artifact_id: str) -> Path:
        return self.staging / f"{artifact_id}{STAGED_NAME_SUFFIX}"

    def staging_root(self, artifact_id: str) -> Path:
        return self.staging / artifact_id

    def journal(self, artifact_id: str, m: mf.Manifest) -> Journal:
        return Journal(self.staging / f"{artifact_id}.journal", artifact_id, m.num_pieces)

    def finalize(self, artifact_id: str, name: str) -> Path:
        """Move a fully verified download into the cache, read-only, then record it complete."""
        src = self.staging_root(artifact_id)
        dst = self.cache / artifact_id
        if dst.exists():
            shutil.rmtree(dst)
        for dirpath, _dirs, files in os.walk(src):
            for f in files:
                p = os.path.join(dirpath, f)
                os.chmod(p, os.stat(p).st_mode & ~0o222)
        try:
            m = self.load_manifest(artifact_id)
        except mf.ManifestError:
            m = None
        if m is not None:  # staging files are created 0o644: give executables back their x bits
            apply_modes(src, m)
        os.rename(src, dst)
        fsync_dir(self.cache)
        self.mark_complete(artifact_id, name, dst, published=False)
        (self.staging / f"{artifact_id}.journal").unlink(missing_ok=True)
        self._staged_name_path(artifact_id).unlink(missing_ok=True)
        return dst

    def reopen_for_repair(self, artifact_id: str, name: str, good: int) -> bool:
        """Turn a cached artifact with corrupt pieces back into a download that resumes from `good`.

        The files move back to staging (writable again) with a journal of the pieces still believed
        good (the resume verifies them all again), and the record goes last: a crash in between
        leaves a download to resume, never a record whose files are wrong. False when the artifact
        is not in the cache (a published source directory is the user's: it is never written).
        """
        src = self.cache / artifact_id
        dst = self.staging_root(artifact_id)
        m = self.load_manifest(artifact_id)
        if m is None or not src.is_dir():
            return False
        for dirpath, _dirs, files in os.walk(src):
            for f in files:
                p = os.path.join(dirpath, f)
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(src, dst)
        fsync_dir(self.staging)
        journal = self.journal(artifact_id, m)
        journal.open(good)
        journal.close()
        self.save_staged_name(artifact_id, name)
        self.forget(artifact_id)
        return True


def apply_modes(root: Path, m: mf.Manifest) -> None:
    for f in m.files:
        p = root / f.path
        mode = 0o555 if f.executable else 0o444
        os.chmod(p, mode)


def materialize(rec: Record, dest: Path) -> Path:
    """Place a complete artifact at `dest` (hard links when on the same filesystem, else copies).

    Each file appears atomically (link/copy to an unpredictable temp name created exclusively, then
    rename), so an interrupted call leaves either the old file or the new one, never a partial file
    under the final name. Nothing at or below `dest` is followed if it is a symlink (issue #14 row 11:
    `dest/sub -> /victimdir` was written through): every directory is opened relative to its parent
    with O_NOFOLLOW, and files are created and renamed relative to that fd.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)  # above dest: the caller's own path, as given
    parent_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        root_fd = _open_subdir(parent_fd, dest.name, dest)
    finally:
        os.close(parent_fd)
    try:
        for f in rec.manifest.files:
            *dirs, name = f.path.split("/")
            fd = root_fd
            try:
                for i, d in enumerate(dirs):
                    sub = _open_subdir(fd, d, dest.joinpath(*dirs[: i + 1]))
                    if fd != root_fd:
                        os.close(fd)
                    fd = sub
                _place_file(rec.root / f.path, fd, name, 0o555 if f.executable else 0o444)
            finally:
                if fd != root_fd:
                    os.close(fd)
    finally:
        os.close(root_fd)
    return dest / rec.manifest.files[0].path if rec.manifest.single_file else dest


def _open_subdir(dir_fd: int, name: str, shown: Path) -> int:
    """Open (creating if needed) directory `name` in `dir_fd`, refusing a symlink in its place."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=dir_fd)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StorageError(
                f"{shown} is a symlink or not a directory: p2pd never writes through links; remove it",
                ErrorCode.BAD_REQUEST,
            ) from e
        raise


def _place_file(src: Path, dir_fd: int, name: str, mode: int) -> None:
    """Hard-link (else copy) `src` as `name` in `dir_fd`, via a fresh temp name and an atomic rename."""
    for _ in range(100):
        tmp = f".{name}.p2pd-tmp-{secrets.token_hex(8)}"
        try:
            os.link(src, tmp, dst_dir_fd=dir_fd, follow_symlinks=False)
            break
        except FileExistsError:
            continue
        except OSError:  # another filesystem (EXDEV) or links not allowed: copy into a new file of our own
            try:
                out = os.open(
                    tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
                )
            except FileExistsError:
                continue
            try:
                with open(src, "rb") as fin, os.fdopen(out, "wb") as fout:
                    shutil.copyfileobj(fin, fout, READ_CHUNK)
                    os.fchmod(fout.fileno(), mode)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            break
    else:
        raise StorageError(f"could not create a temp file beside {name}", ErrorCode.STORAGE)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a symlink itself, never its target
    finally:  # rename onto another link of the same inode does nothing and leaves tmp: remove it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
