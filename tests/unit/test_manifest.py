"""Manifests (p2pd/protocol/manifest.py): path validation, canonical encoding, ids, piece layout."""

from __future__ import annotations

import hashlib
import os

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.protocol import manifest as mf
from p2pd.protocol.manifest import DIGEST_SIZE, FileEntry, Layout, Manifest, ManifestError
from tests.unit._util import FAST, QUICK


def make(files: list[FileEntry], piece_size: int = 4, **kw: object) -> Manifest:
    total = sum(f.size for f in files)
    n = mf.num_pieces(total, piece_size)
    digests = kw.pop("digests", None)
    if digests is None:
        digests = bytes(i % 251 for i in range(n * DIGEST_SIZE))
    return mf.build(files, piece_size, digests, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize(
    "path",
    ["a", "a/b/c.safetensors", "..a", "a..", ".hidden", "dir/.git/x", "a b", "é/ü", "...", "a/...b", "x" * 4096],
)
def test_validate_path_accepts(path: str) -> None:
    mf.validate_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/abs",
        "/",
        "//x",
        "..",
        "../x",
        "a/..",
        "a/../b",
        ".",
        "./a",
        "a/./b",
        "a/.",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "C:\\x",
        "a\x00b",
        "\x00",
        "x" * 4097,
        "é" * 2049,  # 4098 bytes in UTF-8
    ],
)
def test_validate_path_rejects(path: str) -> None:
    with pytest.raises(ManifestError, match="invalid path"):
        mf.validate_path(path)


@FAST
@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "\\", "\x00", "c.d"]), min_size=1, max_size=5), st.booleans())
def test_validate_path_property(parts: list[str], absolute: bool) -> None:
    path = ("/" if absolute else "") + "/".join(parts)
    bad = absolute or any(p in ("", ".", "..") for p in parts) or any("\\" in p or "\x00" in p for p in parts)
    if bad:
        with pytest.raises(ManifestError):
            mf.validate_path(path)
    else:
        mf.validate_path(path)
        # A valid path stays inside any root it is joined to.
        root = "/srv/artifact"
        assert os.path.normpath(os.path.join(root, path)).startswith(root + "/")


@pytest.mark.parametrize("name", ["llama-3-8b:v2", "org/model:latest", "a:b", "Qwen2.5-7B:rev.1_x"])
def test_validate_name_accepts(name: str) -> None:
    mf.validate_name(name)


@pytest.mark.parametrize("name", ["", "noTag", ":tag", "name:", "-x:y", "a:b:c", "a b:c", "a:-b", "a:" + "x" * 200])
def test_validate_name_rejects(name: str) -> None:
    with pytest.raises(ManifestError, match="invalid name"):
        mf.validate_name(name)


# ------------------------------------------------------------------------------------------ validate
def test_build_sorts_files_and_meta() -> None:
    m = make([FileEntry("b", 3), FileEntry("a", 2)], meta={"z": "1", "a": "2"})
    assert [f.path for f in m.files] == ["a", "b"]
    assert list(m.meta) == ["a", "z"]
    assert m.total_size == 5 and m.num_pieces == 2


def _raw(files: list[FileEntry], **kw: object) -> Manifest:
    total = sum(f.size for f in files)
    ps = int(kw.pop("piece_size", 4))  # type: ignore[call-overload]
    fields: dict = dict(
        version=mf.MANIFEST_VERSION,
        kind="files",
        single_file=False,
        piece_size=ps,
        files=tuple(files),
        digests=b"\0" * (mf.num_pieces(total, ps) * DIGEST_SIZE if ps > 0 else 0),
    )
    fields.update(kw)
    return Manifest(**fields)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ([FileEntry("b", 1), FileEntry("a", 1)], "sorted"),
        ([FileEntry("a", 1), FileEntry("a", 1)], "sorted"),
        ([FileEntry("a/b", 1), FileEntry("a/b", 2)], "sorted"),
        ([FileEntry("a", 1), FileEntry("a/b", 1)], "lies under 'a'"),
        ([FileEntry("x/y", 1), FileEntry("x/y/z/w", 1)], "lies under 'x/y'"),
        ([FileEntry("../etc/passwd", 1)], "invalid path"),
        ([FileEntry("/etc/passwd", 1)], "invalid path"),
        ([FileEntry("a", -1)], "negative size"),
    ],
)
def test_validate_rejects_bad_file_lists(files: list[FileEntry], match: str) -> None:
    m = _raw(files)
    with pytest.raises(ManifestError, match=match):
        mf.validate(m)
    with pytest.raises(ManifestError):
        mf.decode(mf.encode(m))


def test_validate_accepts_lookalike_prefixes() -> None:
    mf.validate(_raw([FileEntry("a", 1), FileEntry("a.txt", 1), FileEntry("a0/b", 1), FileEntry("ab/c", 1)]))
    mf.validate(_raw([FileEntry("a.txt", 1), FileEntry("a/b", 1)]))  # '.' sorts before '/'


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"version": 2}, "unsupported manifest version"),
        ({"kind": "weights"}, "unknown artifact kind"),
        ({"piece_size": 0}, "piece size"),
        ({"piece_size": -4}, "piece size"),
        ({"piece_size": (64 << 20) + 1}, "piece size"),
        ({"digests": b"\0" * 15}, "piece digests"),
        ({"digests": b"\0" * 48}, "piece digests"),
        ({"single_file": True}, "exactly one file"),
    ],
)
def test_validate_rejects_bad_fields(kw: dict, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        mf.validate(_raw([FileEntry("a", 3), FileEntry("b", 2)], **kw))


def test_single_file_and_empty_artifacts() -> None:
    m = make([FileEntry("model.bin", 10)], single_file=True, kind="env")
    assert m.single_file and m.num_pieces == 3
    empty = make([FileEntry("empty", 0)])
    assert empty.num_pieces == 0 and empty.digests == b""
    assert mf.decode(mf.encode(empty)) == empty


def test_piece_length_and_digest() -> None:
    m = make([FileEntry("a", 5), FileEntry("b", 4)], piece_size=4)
    assert [m.piece_length(i) for i in range(m.num_pieces)] == [4, 4, 1]
    assert m.digest(1) == m.digests[16:32]
    with pytest.raises(IndexError):
        m.piece_length(3)
    with pytest.raises(IndexError):
        m.piece_length(-1)


# ------------------------------------------------------------------------------------------ encoding and ids
@st.composite
def file_lists(draw: st.DrawFn, max_size: int = 200) -> list[FileEntry]:
    comps = st.sampled_from(["a", "b", "a.b", ".x", "é", "-", "_z", "...", "model.safetensors"])
    paths = draw(st.lists(st.lists(comps, min_size=1, max_size=3).map("/".join), min_size=1, max_size=8, unique=True))
    paths.sort()
    kept: list[str] = []
    for p in paths:  # drop paths that would lie under a file
        parts = p.split("/")
        if not any("/".join(parts[:i]) in kept for i in range(1, len(parts))) and not any(
            k.startswith(p + "/") for k in kept
        ):
            kept.append(p)
    sizes = st.integers(min_value=0, max_value=max_size)
    return [FileEntry(p, draw(sizes), draw(st.booleans())) for p in kept]


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    files = draw(file_lists())
    ps = draw(st.integers(min_value=1, max_value=64))
    n = mf.num_pieces(sum(f.size for f in files), ps)
    digests = draw(st.binary(min_size=n * DIGEST_SIZE, max_size=n * DIGEST_SIZE))
    meta = draw(st.dictionaries(st.sampled_from(["", "b", "a", "python", "ü"]), st.text(max_size=5), max_size=3))
    single = len(files) == 1 and draw(st.booleans())
    return mf.build(files, ps, digests, kind=draw(st.sampled_from(["files", "env"])), single_file=single, meta=meta)


@QUICK
@given(manifests())
def test_encode_decode_canonical_round_trip(m: Manifest) -> None:
    data = mf.encode(m)
    back = mf.decode(data)
    assert back == m
    assert mf.encode(back) == data
    aid = mf.artifact_id(m)
    assert aid == hashlib.sha256(data).hexdigest() and mf.ID_RE.match(aid)
    assert mf.decode_checked(data, aid) == m


@QUICK
@given(manifests(), st.data())
def test_artifact_id_changes_with_any_field(m: Manifest, data: st.DataObject) -> None:
    aid = mf.artifact_id(m)
    variants: list[Manifest] = []
    i = data.draw(st.integers(min_value=0, max_value=len(m.files) - 1))
    f = m.files[i]
    files = list(m.files)
    files[i] = FileEntry(f.path, f.size, not f.executable)
    variants.append(msgspec.structs.replace(m, files=tuple(files)))
    files[i] = FileEntry(f.path + "x", f.size, f.executable)
    variants.append(msgspec.structs.replace(m, files=tuple(files)))
    files[i] = FileEntry(f.path, f.size + 1, f.executable)
    variants.append(msgspec.structs.replace(m, files=tuple(files)))
    if m.digests:
        j = data.draw(st.integers(min_value=0, max_value=len(m.digests) - 1))
        d = bytearray(m.digests)
        d[j] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        variants.append(msgspec.structs.replace(m, digests=bytes(d)))
    variants.append(msgspec.structs.replace(m, piece_size=m.piece_size + 1))
    variants.append(msgspec.structs.replace(m, kind="env" if m.kind == "files" else "files"))
    variants.append(msgspec.structs.replace(m, meta={**m.meta, "extra-key": "v"}))
    for v in variants:
        assert mf.artifact_id(v) != aid


def test_decode_checked_rejects_mismatching_id() -> None:
    m = make([FileEntry("a", 5)])
    data = mf.encode(m)
    other = mf.artifact_id(make([FileEntry("a", 6)]))
    with pytest.raises(ManifestError, match="does not match artifact id"):
        mf.decode_checked(data, other)
    with pytest.raises(ManifestError, match="does not match"):
        mf.decode_checked(data + b"\0", mf.artifact_id(m))


def test_decode_checked_with_valid_id_of_invalid_manifest() -> None:
    bad = mf.encode(_raw([FileEntry("../x", 1)]))
    with pytest.raises(ManifestError, match="invalid path"):
        mf.decode_checked(bad, hashlib.sha256(bad).hexdigest())


def test_decode_rejects_garbage() -> None:
    good = mf.encode(make([FileEntry("abc", 5)]))
    assert b"\xa3abc" in good
    for data in [
        b"",
        b"\xc1",
        b"\x90",
        msgspec.msgpack.encode({"version": 1}),
        b"\x97" + b"\x01" * 7,
        good.replace(b"\xa3abc", b"\xa3a\xffc"),  # a path that is not UTF-8
        b"\x98" + b"\x01" * 7 + b"\x91" * 200_000 + b"\xc0",  # nesting past the recursion limit
    ]:
        with pytest.raises(ManifestError):
            mf.decode(data)


def _fields(m: Manifest) -> list:
    return [
        m.version,
        m.kind,
        m.single_file,
        m.piece_size,
        [[f.path, f.size, f.executable] for f in m.files],
        m.digests,
        m.meta,
    ]


def test_decode_rejects_non_canonical_bytes() -> None:
    m = make([FileEntry("a", 5), FileEntry("b/c", 3)], meta={"a": "1", "b": "2"})
    data = mf.encode(m)
    assert msgspec.msgpack.encode(_fields(m)) == data  # the canonical form is exactly this array
    # 1. an int in a wider encoding than needed (piece_size 4 as uint32)
    wide = b"\x97\x01\xa5files\xc2\xce\x00\x00\x00\x04" + data[10:]
    assert data[:10] == b"\x97\x01\xa5files\xc2\x04"
    with pytest.raises(ManifestError, match="canonical"):
        mf.decode(wide)
    # 2. meta keys out of order
    unsorted = msgspec.msgpack.encode(_fields(m)[:-1] + [{"b": "2", "a": "1"}])
    with pytest.raises(ManifestError, match="canonical"):
        mf.decode(unsorted)
    # 3. the optional trailing field left out
    with pytest.raises(ManifestError, match="canonical"):
        mf.decode(msgspec.msgpack.encode(_fields(m)[:-1]))
    # 4. a str encoded as str8 where fixstr fits
    str8 = data.replace(b"\xa5files", b"\xd9\x05files", 1)
    with pytest.raises(ManifestError, match="canonical"):
        mf.decode(str8)


def test_meta_order_does_not_change_the_id() -> None:
    built = make([FileEntry("a", 5)], meta={"b": "2", "a": "1"})
    direct = Manifest(mf.MANIFEST_VERSION, "files", False, 4, built.files, built.digests, {"b": "2", "a": "1"})
    assert mf.encode(direct) == mf.encode(built)
    assert mf.artifact_id(direct) == mf.artifact_id(built)


def test_decode_rejects_trailing_bytes() -> None:
    data = mf.encode(make([FileEntry("a", 5)]))
    with pytest.raises(ManifestError):
        mf.decode(data + b"\x00")


# ------------------------------------------------------------------------------------------ piece size
@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (0, mf.MIN_PIECE),
        (1, mf.MIN_PIECE),
        (mf.MIN_PIECE * mf.TARGET_PIECES, mf.MIN_PIECE),
        (mf.MIN_PIECE * mf.TARGET_PIECES + 1, 2 * mf.MIN_PIECE),
        (512 << 20, 256 << 10),  # the emulated benchmarks' payload: 2048 pieces of 256 KiB
        (2 << 30, 1 << 20),
        (8 << 30, 4 << 20),
        ((8 << 30) + 1, 8 << 20),
        (32 << 30, mf.MAX_PIECE),
        (1 << 50, mf.MAX_PIECE),
    ],
)
def test_choose_piece_size_examples(total: int, expected: int) -> None:
    assert mf.choose_piece_size(total) == expected


@FAST
@given(st.integers(min_value=0, max_value=1 << 50))
def test_choose_piece_size_bounds(total: int) -> None:
    ps = mf.choose_piece_size(total)
    assert mf.MIN_PIECE <= ps <= mf.MAX_PIECE
    assert ps & (ps - 1) == 0
    if ps < mf.MAX_PIECE:
        assert mf.num_pieces(total, ps) <= mf.TARGET_PIECES
    if ps > mf.MIN_PIECE:
        assert mf.num_pieces(total, ps // 2) > mf.TARGET_PIECES  # the smallest size that fits the target


# ------------------------------------------------------------------------------------------ layout
def _naive_spans(sizes: list[int], offset: int, length: int) -> list[tuple[int, int, int]]:
    """Walk the concatenation byte by byte, merging runs in the same file."""
    owner: list[tuple[int, int]] = []
    for i, s in enumerate(sizes):
        owner += [(i, k) for k in range(s)]
    out: list[tuple[int, int, int]] = []
    for fi, off in owner[offset : offset + length]:
        if out and out[-1][0] == fi:
            out[-1] = (fi, out[-1][1], out[-1][2] + 1)
        else:
            out.append((fi, off, 1))
    return out


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[int], int]:
    sizes = draw(st.lists(st.integers(min_value=0, max_value=40) | st.just(0), min_size=1, max_size=10))
    return sizes, draw(st.integers(min_value=1, max_value=50))


@FAST
@given(layouts())
def test_layout_piece_spans_match_naive(sl: tuple[list[int], int]) -> None:
    sizes, ps = sl
    files = [FileEntry(f"f{i:03d}", s) for i, s in enumerate(sizes)]
    m = make(files, piece_size=ps)
    layout = Layout(m)
    blob = b"".join(bytes([i]) * s for i, s in enumerate(sizes))  # byte value = file index
    covered = bytearray()
    for p in range(m.num_pieces):
        spans = layout.piece_spans(p)
        assert spans == _naive_spans(sizes, p * ps, m.piece_length(p))
        assert all(n > 0 and off >= 0 and off + n <= sizes[fi] for fi, off, n in spans)
        piece = b"".join(bytes([fi]) * n for fi, _off, n in spans)
        assert piece == blob[p * ps : p * ps + m.piece_length(p)]
        covered += piece
    assert covered == blob


@FAST
@given(layouts(), st.data())
def test_layout_arbitrary_ranges(sl: tuple[list[int], int], data: st.DataObject) -> None:
    sizes, ps = sl
    m = make([FileEntry(f"f{i:03d}", s) for i, s in enumerate(sizes)], piece_size=ps)
    total = sum(sizes)
    off = data.draw(st.integers(min_value=0, max_value=total))
    length = data.draw(st.integers(min_value=0, max_value=total - off))
    assert Layout(m).spans(off, length) == _naive_spans(sizes, off, length)


def test_layout_with_tree_and_empty_files() -> None:
    m = make([FileEntry("a/empty", 0), FileEntry("a/x", 6), FileEntry("b", 0), FileEntry("c", 3)], piece_size=4)
    layout = Layout(m)
    assert layout.total == 9
    assert [layout.piece_spans(i) for i in range(m.num_pieces)] == [[(1, 0, 4)], [(1, 4, 2), (3, 0, 2)], [(3, 2, 1)]]
