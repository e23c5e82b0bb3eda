"""Piece storage (p2pd/storage.py): hashing, piece store, journal, catalog, materialize."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from p2pd import storage
from p2pd.errors import ErrorCode
from p2pd.protocol import manifest as mf
from p2pd.storage import Catalog, Journal, PieceStore, Record, StorageError
from tests.unit._util import QUICK


def naive_digests(blob: bytes, piece_size: int) -> bytes:
    return b"".join(xxhash.xxh3_128_digest(blob[i : i + piece_size]) for i in range(0, len(blob), piece_size))


def write_tree(root: Path, files: dict[str, bytes], executable: tuple[str, ...] = ()) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if rel in executable:
            p.chmod(0o755)


TREE = {
    "config.json": b'{"a": 1}',
    "empty": b"",
    "nested/deeper/shard-00001.bin": bytes(range(256)) * 41,
    "nested/empty2": b"",
    "nested/shard-00000.bin": os.urandom(5000),
    "tokenizer.json": b"t" * 333,
}


def concat(files: dict[str, bytes]) -> bytes:
    return b"".join(files[k] for k in sorted(files))


def small_manifest(src: Path, piece_size: int) -> mf.Manifest:
    """A manifest of `src` with a tiny piece size, so pieces cross many file boundaries."""
    entries, root, single = storage.scan_source(src)
    digests = storage.hash_pieces(root, entries, piece_size)
    return mf.build(entries, piece_size, digests, single_file=single)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_tree(src, TREE, executable=("tokenizer.json",))
    return src


# ------------------------------------------------------------------------------------------ hashing
@pytest.mark.parametrize("piece_size", [1, 7, 64, 256, 4096, 1 << 20])
def test_hash_pieces_across_file_boundaries(tree: Path, piece_size: int) -> None:
    entries, root, _ = storage.scan_source(tree)
    seen: list[tuple[int, int]] = []
    got = storage.hash_pieces(root, entries, piece_size, lambda done, total: seen.append((done, total)))
    blob = concat(TREE)
    assert got == naive_digests(blob, piece_size)
    assert seen[-1] == (len(blob), len(blob))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@QUICK
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6), st.integers(min_value=1, max_value=200))
def test_hash_pieces_property(contents: list[bytes], piece_size: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        files = {f"f{i}": c for i, c in enumerate(contents)}
        write_tree(Path(d), files)
        entries = [mf.FileEntry(k, len(v)) for k, v in reversed(files.items())]  # order given does not matter
        assert storage.hash_pieces(Path(d), entries, piece_size) == naive_digests(concat(files), piece_size)


def test_hash_pieces_file_shrank(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    with pytest.raises(StorageError, match="shrank while hashing"):
        storage.hash_pieces(tmp_path, [mf.FileEntry("a", 10)], 4)


# ------------------------------------------------------------------------------------------ build_manifest
def test_build_manifest_single_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    p = tmp_path / "env.tar.zst"
    p.write_bytes(data)
    m, root = storage.build_manifest(p, kind="env", meta={"python": "3.11"})
    assert root == tmp_path
    assert m.single_file and m.kind == "env" and m.meta == {"python": "3.11"}
    assert m.files == (mf.FileEntry("env.tar.zst", len(data), False),)
    assert m.piece_size == mf.MIN_PIECE and m.num_pieces == -(-len(data) // mf.MIN_PIECE)
    assert m.digests == naive_digests(data, m.piece_size)


def test_build_manifest_tree(tree: Path) -> None:
    m, root = storage.build_manifest(tree)
    assert root == tree and not m.single_file and m.kind == "files"
    assert [f.path for f in m.files] == sorted(TREE)
    assert {f.path: f.size for f in m.files} == {k: len(v) for k, v in TREE.items()}
    assert [f.path for f in m.files if f.executable] == ["tokenizer.json"]
    assert m.digests == naive_digests(concat(TREE), m.piece_size)
    assert mf.decode(mf.encode(m)) == m


def test_build_manifest_sort_order_is_path_order(tmp_path: Path) -> None:
    # '.' (0x2e) sorts before '/' (0x2f): "a.txt" comes before "a/b" in the manifest, whatever os.walk does.
    files = {"a/b": b"1", "a.txt": b"22", "a0": b"333", "B": b"4"}
    write_tree(tmp_path / "s", files)
    m, _ = storage.build_manifest(tmp_path / "s")
    assert [f.path for f in m.files] == sorted(files)
    assert m.digests == naive_digests(concat(files), m.piece_size)


def test_build_manifest_follows_symlinks_to_files(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "x").write_bytes(b"weights")
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model.bin").symlink_to(blobs / "x")
    m, _ = storage.build_manifest(snap)
    assert m.files == (mf.FileEntry("model.bin", 7, False),)


def test_scan_source_errors(tmp_path: Path) -> None:
    (tmp_path / "emptydir" / "sub").mkdir(parents=True)
    (tmp_path / "withfifo").mkdir()
    os.mkfifo(tmp_path / "withfifo" / "pipe")
    for path, needle in [
        ("nope", "does not exist"),
        ("emptydir", "contains no files"),
        ("withfifo", "not a regular file"),
    ]:
        with pytest.raises(StorageError, match=needle) as ei:
            storage.scan_source(tmp_path / path)
        assert ei.value.code is ErrorCode.BAD_REQUEST  # the source the user named is unusable


# ------------------------------------------------------------------------------------------ piece store
@pytest.mark.parametrize("piece_size", [5, 64, 1000])
def test_piece_store_round_trip(tree: Path, tmp_path: Path, piece_size: int) -> None:
    m = small_manifest(tree, piece_size)
    src = PieceStore(m, tree, writable=False)
    dst = PieceStore(m, tmp_path / "staging", writable=True)
    dst.preallocate()
    for f in m.files:
        p = tmp_path / "staging" / f.path
        assert p.is_file() and p.stat().st_size == f.size
    order = list(range(m.num_pieces))
    random.Random(piece_size).shuffle(order)
    for i in order:
        data = src.read_piece(i)
        assert len(data) == m.piece_length(i)
        assert src.verify(i, data)
        dst.write_piece(i, memoryview(data))
    for i in range(m.num_pieces):
        assert dst.read_piece(i) == src.read_piece(i)
    dst.sync()
    dst.close()
    src.close()
    for rel, content in TREE.items():
        assert (tmp_path / "staging" / rel).read_bytes() == content


def test_verify_rejects_wrong_data(tree: Path) -> None:
    m = small_manifest(tree, 100)
    store = PieceStore(m, tree, writable=False)
    data = store.read_piece(3)
    assert store.verify(3, data)
    assert not store.verify(4, data)
    data[0] ^= 1
    assert not store.verify(3, data)
    assert not store.verify(3, bytes(data[:-1]))
    store.close()


def test_spans_give_fds_for_sendfile(tree: Path) -> None:
    m = small_manifest(tree, 1000)
    store = PieceStore(m, tree, writable=False)
    blob = concat(TREE)
    for i in range(m.num_pieces):
        with store.pinned_spans(i) as spans:
            got = b"".join(os.pread(fd, n, off) for fd, off, n in spans)
        assert got == blob[i * 1000 : i * 1000 + m.piece_length(i)]
    store.close()
    assert store.open_files == 0


def test_short_read_raises_storage_error(tree: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    m = small_manifest(copy, 1000)
    os.truncate(copy / "nested/shard-00000.bin", 10)
    store = PieceStore(m, copy, writable=False)
    layout = mf.Layout(m)
    idx = next(
        i
        for i in range(m.num_pieces)
        if any(m.files[f].path == "nested/shard-00000.bin" and off + n > 10 for f, off, n in layout.piece_spans(i))
    )
    with pytest.raises(StorageError, match=f"short read of piece {idx}"):
        store.read_piece(idx)
    store.close()


def test_preallocate_keeps_existing_data(tree: Path, tmp_path: Path) -> None:
    m = small_manifest(tree, 64)
    root = tmp_path / "staging"
    s1 = PieceStore(m, root, writable=True)
    s1.preallocate()
    s1.write_piece(0, PieceStore(m, tree, writable=False).read_piece(0))
    s1.close()
    s2 = PieceStore(m, root, writable=True)
    s2.preallocate()  # a restarted daemon preallocates again
    assert s2.verify(0, s2.read_piece(0))
    s2.close()


def test_preallocate_disk_too_small(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = small_manifest(tree, 64)
    total = m.total_size
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=total - 1))
    root = tmp_path / "staging"
    store = PieceStore(m, root, writable=True)
    with pytest.raises(StorageError, match=r"not enough disk space in .*staging: need .* GB more, .* GB free") as ei:
        store.preallocate()
    assert ei.value.code is ErrorCode.DISK_FULL
    assert list(root.iterdir()) == []  # refused before creating anything
    # With the files already there at full size (a resumed download), nothing more is needed.
    monkeypatch.setattr(shutil, "disk_usage", real)
    store.preallocate()
    store.close()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    again = PieceStore(m, root, writable=True)
    again.preallocate()
    again.close()


def test_enospc_is_disk_full_and_other_failures_keep_their_kind(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The code is set where ENOSPC is seen, so the daemon passes it on without reading the message."""
    m = small_manifest(tree, 64)
    piece = PieceStore(m, tree, writable=False).read_piece(0)
    store = PieceStore(m, tmp_path / "staging", writable=True)
    store.preallocate()
    fail_with = errno.ENOSPC

    def pwrite(fd: int, data: bytes, off: int) -> int:
        raise OSError(fail_with, os.strerror(fail_with))

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(StorageError, match="disk full writing under") as ei:
        store.write_piece(0, piece)
    assert ei.value.code is ErrorCode.DISK_FULL
    fail_with = errno.EIO  # not a full disk: stays an OSError for the caller to handle
    with pytest.raises(OSError) as oi:
        store.write_piece(0, piece)
    assert not isinstance(oi.value, StorageError)
    monkeypatch.undo()
    store.close()

    def fallocate(fd: int, off: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(storage, "filesystem_type", lambda p: "ext4")
    with pytest.raises(StorageError, match="disk full while preallocating") as ei:
        PieceStore(m, tmp_path / "other", writable=True).preallocate()
    assert ei.value.code is ErrorCode.DISK_FULL
    assert StorageError("any other storage failure").code is ErrorCode.STORAGE


# ------------------------------------------------------------------------------------------ journal
AID = "ab" * 32


def test_journal_round_trip(tmp_path: Path) -> None:
    j = Journal(tmp_path / "x.journal", AID, 21)
    assert j.load() == 0  # absent
    j.open(0b101)
    j.record(0b101 | 1 << 20)
    j.close()
    j2 = Journal(tmp_path / "x.journal", AID, 21)
    assert j2.load() == 0b101 | 1 << 20
    j2.open(j2.load())
    j2.record(0b111)
    j2.close()
    assert Journal(tmp_path / "x.journal", AID, 21).load() == 0b111
    j2.close(delete=True)
    assert not (tmp_path / "x.journal").exists()


def test_journal_rejects_foreign_or_damaged_files(tmp_path: Path) -> None:
    p = tmp_path / "x.journal"
    j = Journal(p, AID, 16)
    j.open(0xFFFF)
    j.close()
    good = p.read_bytes()
    assert good[:8] == storage.JOURNAL_MAGIC and len(good) == 8 + 32 + 2
    assert Journal(p, "cd" * 32, 16).load() == 0  # another artifact's journal
    assert Journal(p, AID, 17).load() == 0  # wrong length for this piece count
    for bad in [b"", b"garbage", b"X" + good[1:], good[:-1], good + b"\0"]:
        p.write_bytes(bad)
        assert Journal(p, AID, 16).load() == 0


def test_journal_ignores_spare_bits(tmp_path: Path) -> None:
    p = tmp_path / "x.journal"
    p.write_bytes(storage.JOURNAL_MAGIC + bytes.fromhex(AID) + b"\xff")
    assert Journal(p, AID, 3).load() == 0b111


def test_verify_existing_drops_corrupted_piece(tree: Path, tmp_path: Path) -> None:
    m = small_manifest(tree, 64)
    src = PieceStore(m, tree, writable=False)
    root = tmp_path / "staging"
    dst = PieceStore(m, root, writable=True)
    dst.preallocate()
    for i in range(m.num_pieces):
        dst.write_piece(i, src.read_piece(i))
    full = (1 << m.num_pieces) - 1
    assert dst.verify_existing(full) == full
    victim = 37
    fi, off, _n = mf.Layout(m).piece_spans(victim)[0]
    with open(root / m.files[fi].path, "r+b") as fh:
        fh.seek(off)
        b = fh.read(1)
        fh.seek(off)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert dst.verify_existing(full) == full & ~(1 << victim)
    assert dst.verify_existing(full | 1 << (m.num_pieces + 3)) == full & ~(1 << victim)  # out of range: dropped
    assert dst.verify_existing(0) == 0
    src.close()
    dst.close()


def test_resume_from_journal(tree: Path, tmp_path: Path) -> None:
    """A crash after some pieces: the restarted store keeps exactly the pieces both journalled and intact."""
    m = small_manifest(tree, 100)
    src = PieceStore(m, tree, writable=False)
    cat = Catalog(tmp_path / "data")
    aid = mf.artifact_id(m)
    store = PieceStore(m, cat.staging_root(aid), writable=True)
    j = cat.journal(aid, m)
    assert j.load() == 0
    store.preallocate()
    j.open(0)
    mask = 0
    for i in range(0, m.num_pieces, 2):
        store.write_piece(i, src.read_piece(i))
        mask |= 1 << i
        j.record(mask)
    store.write_piece(1, src.read_piece(1))  # written but not journalled (in flight at the crash)
    store.close()
    j.close()
    assert cat.staged_ids() == [aid]
    again = PieceStore(m, cat.staging_root(aid), writable=True)
    j2 = cat.journal(aid, m)
    recorded = j2.load()
    again.preallocate()
    assert recorded == mask and again.verify_existing(recorded) == mask
    again.close()
    src.close()


# ------------------------------------------------------------------------------------------ catalog
def _download(cat: Catalog, src_root: Path, m: mf.Manifest) -> str:
    aid = mf.artifact_id(m)
    cat.save_manifest(aid, m)
    src = PieceStore(m, src_root, writable=False)
    dst = PieceStore(m, cat.staging_root(aid), writable=True)
    dst.preallocate()
    j = cat.journal(aid, m)
    j.open(0)
    for i in range(m.num_pieces):
        dst.write_piece(i, src.read_piece(i))
    j.record((1 << m.num_pieces) - 1)
    j.close()
    dst.sync()
    dst.close()
    src.close()
    return aid


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_finalize_moves_to_cache_read_only_and_records_last(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = Catalog(tmp_path / "data")
    m, _ = storage.build_manifest(tree)
    aid = _download(cat, tree, m)
    assert cat.complete_records() == []
    order: list[str] = []
    real_write = storage.atomic_write

    def spy(path: Path, data: bytes) -> None:
        if path.suffix == ".json":
            # The record must only appear once the data is in its final place.
            assert (cat.cache / aid / "config.json").is_file()
            assert not cat.staging_root(aid).exists()
            order.append("record")
        real_write(path, data)

    monkeypatch.setattr(storage, "atomic_write", spy)
    dst = cat.finalize(aid, "model:v1")
    assert order == ["record"]
    assert dst == cat.cache / aid
    assert not cat.staging_root(aid).exists()
    assert not (cat.staging / f"{aid}.journal").exists()
    assert cat.staged_ids() == []
    for f in m.files:
        p = dst / f.path
        assert p.read_bytes() == TREE[f.path]
        assert _mode(p) & 0o222 == 0, f"{f.path} is writable"
        assert bool(_mode(p) & 0o111) == f.executable, f"{f.path}: executable bit does not follow the manifest"
    (rec,) = cat.complete_records()
    assert (rec.artifact_id, rec.name, rec.root, rec.published) == (aid, "model:v1", dst, False)
    assert rec.manifest == m and rec.path == dst
    assert json.loads((cat.artifacts / f"{aid}.json").read_text())["name"] == "model:v1"


def test_finalize_replaces_a_stale_cache_dir(tree: Path, tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "data")
    m = small_manifest(tree, 1000)
    aid = _download(cat, tree, m)
    (cat.cache / aid / "junk").mkdir(parents=True)
    dst = cat.finalize(aid, "x:y")
    assert not (dst / "junk").exists()
    assert (dst / "config.json").read_bytes() == TREE["config.json"]


def test_staged_name_lives_until_the_download_is_finalized(tree: Path, tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "data")
    m = small_manifest(tree, 1000)
    aid = mf.artifact_id(m)
    assert cat.staged_name(aid) is None
    cat.save_staged_name(aid, "model:v1")
    cat.save_staged_name(aid, "model:v2")  # the latest request's name wins
    assert [p.name for p in cat.staging.iterdir()] == [f"{aid}.name.json"]  # atomic: no temp file left
    _download(cat, tree, m)
    restarted = Catalog(cat.data_dir)
    assert restarted.staged_ids() == [aid] and restarted.staged_name(aid) == "model:v2"
    cat.finalize(aid, "model:v2")
    assert cat.staged_name(aid) is None
    assert list(cat.staging.iterdir()) == []  # nothing of the finished download is left in staging


def test_staged_names_without_a_download_are_removed_at_start(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "data")
    gone, live = "ab" * 32, "cd" * 32
    cat.save_staged_name(gone, "gone:v1")  # no journal: finished by an older version, or never started
    cat.save_staged_name(live, "live:v1")
    (cat.staging / f"{live}.journal").write_bytes(b"")
    assert cat.staged_ids() == [live]
    assert cat.staged_name(gone) is None and not (cat.staging / f"{gone}.name.json").exists()
    assert cat.staged_name(live) == "live:v1"


def test_damaged_staged_name_reads_as_none(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "data")
    for bad in [b"", b"\xff", b"[1]", b'"x"', b'{"nom": "x"}']:
        (cat.staging / f"{AID}.name.json").write_bytes(bad)
        assert cat.staged_name(AID) is None, bad


def test_catalog_basics(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "data")
    nid = cat.node_id()
    assert len(nid) == 32 and Catalog(tmp_path / "data").node_id() == nid
    (tmp_path / "data" / "node_id").write_text("garbage")
    assert cat.node_id() not in (nid, "garbage")
    assert cat.load_manifest("00" * 32) is None
    m = mf.build([mf.FileEntry("a", 3)], 4, b"\1" * 16)
    aid = mf.artifact_id(m)
    cat.save_manifest(aid, m)
    assert cat.load_manifest(aid) == m
    cat.mark_complete(aid, "a:b", tmp_path, published=True)
    assert [r.name for r in cat.complete_records()] == ["a:b"]
    cat.forget(aid)
    assert cat.complete_records() == []
    # A manifest stored under the wrong id is refused.
    (cat.artifacts / f"{'11' * 32}.manifest").write_bytes(mf.encode(m))
    with pytest.raises(mf.ManifestError):
        cat.load_manifest("11" * 32)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    storage.atomic_write(tmp_path / "f", b"one")
    storage.atomic_write(tmp_path / "f", b"two")
    assert (tmp_path / "f").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


# ------------------------------------------------------------------------------------------ materialize
@pytest.fixture
def record(tree: Path, tmp_path: Path) -> Iterator[Record]:
    cat = Catalog(tmp_path / "data")
    m, _ = storage.build_manifest(tree)
    aid = _download(cat, tree, m)
    cat.finalize(aid, "model:v1")
    (rec,) = cat.complete_records()
    yield rec


def _tmp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".p2pd-tmp-" in p.name]


def test_materialize_tree_with_hard_links(record: Record, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "model"
    assert storage.materialize(record, dest) == dest
    for f in record.manifest.files:
        p = dest / f.path
        assert p.read_bytes() == TREE[f.path]
        assert p.stat().st_ino == (record.root / f.path).stat().st_ino  # hard link, no copy
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(TREE)
    assert _tmp_leftovers(dest) == []
    # Again over an existing tree (same inodes, then a stale file of other content).
    assert storage.materialize(record, dest) == dest
    (dest / "config.json").unlink()
    (dest / "config.json").write_bytes(b"stale")
    storage.materialize(record, dest)
    assert (dest / "config.json").read_bytes() == TREE["config.json"]
    assert _tmp_leftovers(dest) == []


def test_materialize_single_file(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "data")
    (tmp_path / "env.tar").write_bytes(b"packed env" * 1000)
    m, root = storage.build_manifest(tmp_path / "env.tar", kind="env")
    aid = _download(cat, root, m)
    cat.finalize(aid, "env:v1")
    (rec,) = cat.complete_records()
    assert rec.path == cat.cache / aid / "env.tar"
    out = storage.materialize(rec, tmp_path / "dest")
    assert out == tmp_path / "dest" / "env.tar"
    assert out.read_bytes() == b"packed env" * 1000


def test_materialize_failure_leaves_no_partial_file(record: Record, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "nested").mkdir()
    (dest / "nested" / "shard-00000.bin").write_bytes(b"old version")
    # The cache lost a file (disk trouble): materialize fails on it...
    victim = record.root / "nested" / "shard-00000.bin"
    victim.chmod(0o644)
    victim.unlink()
    with pytest.raises(OSError):
        storage.materialize(record, dest)
    # ...leaving the old file as it was, files before it complete, and no temp files.
    assert (dest / "nested" / "shard-00000.bin").read_bytes() == b"old version"
    assert (dest / "config.json").read_bytes() == TREE["config.json"]
    assert _tmp_leftovers(dest) == []


def test_materialize_copies_across_filesystems(record: Record) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == record.root.stat().st_dev:
        pytest.skip("needs /dev/shm on a different filesystem than the temp dir to exercise the copy path")
    with tempfile.TemporaryDirectory(dir=shm) as d:
        dest = Path(d) / "model"
        storage.materialize(record, dest)
        for f in record.manifest.files:
            p = dest / f.path
            assert p.read_bytes() == TREE[f.path]
            assert _mode(p) == (0o555 if f.executable else 0o444)
        assert _tmp_leftovers(dest) == []


def test_filesystem_type_finds_the_longest_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = "/dev/sda1 / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\nmy\\040disk /mnt/my\\040disk xfs rw 0 0\n"
    real_open = open

    def fake_open(path: object, *a: object, **kw: object) -> object:
        if path == "/proc/self/mounts":
            import io

            return io.StringIO(mounts)
        return real_open(path, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", fake_open)
    assert storage.filesystem_type(Path("/dev/shm/p2pd/staging")) == "tmpfs"
    assert storage.filesystem_type(Path("/dev/shmem")) == "ext4"  # a prefix of a name is not a parent
    assert storage.filesystem_type(Path("/mnt/my disk/x")) == "xfs"
    assert storage.filesystem_type(Path("/")) == "ext4"


@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_preallocate_reserves_blocks_on_disks_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fstype: str
) -> None:
    """On tmpfs, reserving would zero-fill every page before the download overwrites it."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(os.urandom(1 << 20))
    m = small_manifest(tmp_path / "src", 1 << 16)
    real_fs = storage.filesystem_type(tmp_path)
    monkeypatch.setattr(storage, "filesystem_type", lambda p: fstype)
    store = PieceStore(m, tmp_path / "staging", writable=True)
    store.preallocate()
    st = (tmp_path / "staging" / "w.bin").stat()
    store.close()
    assert st.st_size == 1 << 20
    if real_fs in ("ext4", "xfs") and fstype == "ext4":
        assert st.st_blocks * 512 >= 1 << 20  # reserved
    if fstype == "tmpfs":
        assert st.st_blocks == 0  # only sized: sparse until pieces arrive


# ------------------------------------------------------------------------------------------ open-file LRU
@pytest.fixture
def low_fd_limit() -> Iterator[int]:
    """The soft RLIMIT_NOFILE lowered to what this process uses now plus 200 (restored after)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    limit = in_use + 200
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_store_of_many_files_stays_within_its_open_file_bound(tmp_path: Path, low_fd_limit: int) -> None:
    """3,000 one-byte files (issue #14 row 5): preallocate, write, read and seed with a bounded LRU of fds."""
    files = {f"d{i % 7}/f{i:05d}": bytes([i % 251]) for i in range(3000)}
    src = tmp_path / "src"
    write_tree(src, files)
    m = small_manifest(src, 64)  # each piece spans 64 files
    staged = PieceStore(m, tmp_path / "staging", writable=True, max_open=16)
    staged.preallocate()
    assert staged.open_files <= 16
    seed = PieceStore(m, src, writable=False, max_open=16)
    for i in range(m.num_pieces):
        staged.write_piece(i, seed.read_piece(i))
        assert staged.open_files <= 16 and seed.open_files <= 16
    staged.sync()
    assert staged.verify_existing(bits_full(m.num_pieces)) == bits_full(m.num_pieces)
    for i in range(m.num_pieces):
        with seed.pinned_spans(i) as spans:
            assert b"".join(os.pread(fd, n, off) for fd, off, n in spans) == staged.read_piece(i)
    staged.close()
    seed.close()
    assert staged.open_files == 0 and seed.open_files == 0


def test_pinned_fds_survive_eviction_and_close(tmp_path: Path) -> None:
    """An fd handed out for sendfile is never closed (nor its number reused) while it is in use."""
    files = {f"f{i:03d}": bytes([i]) * 10 for i in range(50)}
    src = tmp_path / "src"
    write_tree(src, files)
    m = small_manifest(src, 10)  # one file per piece
    store = PieceStore(m, src, writable=False, max_open=2)
    with store.pinned_spans(0) as spans:
        ((fd, off, n),) = spans
        for i in range(1, 50):
            assert store.read_piece(i) == files[f"f{i:03d}"]
        store.close()  # a pinned fd closes when released, not under its user
        assert os.pread(fd, n, off) == files["f000"]
    assert store.open_files == 0
    with pytest.raises(OSError):
        os.fstat(fd)
    assert store.read_piece(3) == files["f003"]  # a closed store still answers, holding nothing open
    assert store.open_files == 0


def test_sync_reaches_files_whose_fd_was_evicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"f{i:03d}": bytes([i]) * 10 for i in range(20)}
    src = tmp_path / "src"
    write_tree(src, files)
    m = small_manifest(src, 10)
    seed = PieceStore(m, src, writable=False)
    store = PieceStore(m, tmp_path / "staging", writable=True, max_open=3)
    store.preallocate()
    for i in range(m.num_pieces):
        store.write_piece(i, seed.read_piece(i))
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.sync()
    assert sorted(Path(p).name for p in synced) == sorted(files)
    store.close()
    seed.close()


def bits_full(n: int) -> int:
    return (1 << n) - 1


def test_materialize_never_writes_through_a_planted_symlink(record: Record, tmp_path: Path) -> None:
    """Issue #14 row 11: `dest/nested -> /victimdir` was written through."""
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "nested").symlink_to(victim)
    with pytest.raises(StorageError, match="symlink") as ei:
        storage.materialize(record, dest)
    assert ei.value.code is ErrorCode.BAD_REQUEST
    assert list(victim.iterdir()) == []
    (dest / "nested").unlink()
    (tmp_path / "elsewhere").mkdir()
    dest2 = tmp_path / "linked-dest"
    dest2.symlink_to(tmp_path / "elsewhere")  # dest itself a symlink: refused too
    with pytest.raises(StorageError, match="symlink"):
        storage.materialize(record, dest2)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_materialize_replaces_a_symlink_at_a_file_name_instead_of_following_it(record: Record, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "config.json").symlink_to(target)
    storage.materialize(record, dest)
    assert target.read_bytes() == b"keep me"
    assert not (dest / "config.json").is_symlink()
    assert (dest / "config.json").read_bytes() == TREE["config.json"]
