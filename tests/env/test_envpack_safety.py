"""Malicious env archives are refused, name the offending member, and leave nothing on disk.

Each archive starts with harmless members (so the refusal happens after a partial extraction that
must be cleaned up) and targets a sentinel path outside the envs root that must never appear.
Needs nothing but the standard library (and zstandard for the .tar.zst case).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from condabuild import base_python

from p2pd.envpack import UNPACKED_SLACK_BYTES, EnvPackError, UnsafeArchiveError, materialize

Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), mode
    return ti, data


def dirm(name: str, mode: int = 0o755) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, mode
    return ti, None


def sym(name: str, target: str) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti, None


def hard(name: str, target: str) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.LNKTYPE, target
    return ti, None


def special(name: str, kind: bytes) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.devmajor, ti.devminor = 1, 3
    return ti, None


BENIGN = [dirm("bin"), reg("bin/tool", b"#!/bin/sh\necho ok\n", 0o755), reg("share/data.txt", b"data" * 1000)]


def write_tar(path: Path, members: list[Member], fmt: str = "tar") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if fmt == "tar.gz":
        import gzip

        raw = gzip.compress(raw)
    elif fmt == "tar.zst":
        zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed: pip install zstandard")
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


@pytest.fixture
def box(envs_root: Path) -> Iterator[tuple[Path, Path]]:
    """(envs_root, outside): ``outside`` is a sibling dir that no archive may write into."""
    outside = envs_root.parent / "outside"
    outside.mkdir(parents=True)
    yield envs_root, outside
    assert os.listdir(outside) == [], f"something was written outside the envs root: {os.listdir(outside)}"


def escape_cases(outside: Path) -> dict[str, tuple[list[Member], str]]:
    """name -> (members after BENIGN, the member the error must name)."""
    rel_out = "../../outside"  # from envs_root/.tmp-xxx/ to the sibling of envs_root
    return {
        "path_traversal": ([reg(f"{rel_out}/evil")], "outside/evil"),
        "dotdot_inside_name": ([reg("bin/../../x")], "bin/../../x"),
        "absolute_path": ([reg(f"{outside}/evil")], f"{outside}/evil"),
        "symlink_escape_relative": ([sym("lib/escape", f"../{rel_out}")], "lib/escape"),
        "symlink_escape_absolute": ([sym("lib/escape", str(outside))], "lib/escape"),
        "symlink_then_write_through": ([sym("lib", "bin"), reg("lib/evil")], "lib/evil"),
        "symlink_chain_escape": ([sym("loop", "."), sym("chain", "loop/loop/../..")], "chain"),
        "hardlink_escape_absolute": ([hard("bin/passwd", "/etc/passwd")], "bin/passwd"),
        "hardlink_escape_relative": ([hard("bin/h", f"{rel_out}/x")], "bin/h"),
        "hardlink_to_symlink": ([sym("s", "bin/tool"), hard("h", "s")], "h"),
        "char_device": ([special("dev/null", tarfile.CHRTYPE)], "dev/null"),
        "block_device": ([special("dev/sda", tarfile.BLKTYPE)], "dev/sda"),
        "fifo": ([special("run/fifo", tarfile.FIFOTYPE)], "run/fifo"),
        "setuid": ([reg("bin/su", b"\x7fELF", 0o4755)], "bin/su"),
        "setgid": ([reg("bin/sg", b"\x7fELF", 0o2755)], "bin/sg"),
        "setgid_dir": ([dirm("shared", 0o2775)], "shared"),
        "dir_over_file": ([dirm("bin/tool")], "bin/tool"),
        "venv_link_in_conda_env": ([sym("bin/python", sys.executable)], "bin/python"),
    }


CASES = list(escape_cases(Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_malicious_archive_refused_and_nothing_left(box: tuple[Path, Path], case: str) -> None:
    envs_root, outside = box
    members, offender = escape_cases(outside)[case]
    archive = write_tar(envs_root.parent / "evil.tar", BENIGN + members)
    with pytest.raises(UnsafeArchiveError) as err:
        materialize(archive, envs_root, "e" * 64, {"env_type": "conda"} if "venv" in case else {})
    assert offender in str(err.value)
    assert os.listdir(envs_root) == [], f"left behind: {os.listdir(envs_root)}"


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst"])
def test_refused_in_compressed_streams_too(box: tuple[Path, Path], fmt: str) -> None:
    envs_root, outside = box
    archive = write_tar(envs_root.parent / f"evil.{fmt}", BENIGN + [reg("../../outside/evil")], fmt)
    with pytest.raises(UnsafeArchiveError, match="outside/evil"):
        materialize(archive, envs_root, "e" * 64, {"env_format": fmt})
    assert os.listdir(envs_root) == []


def test_venv_interpreter_link_allowed_only_for_bin_python(box: tuple[Path, Path]) -> None:
    """A venv's bin/python may point at its absolute base interpreter; nothing else may."""
    envs_root, outside = box
    python = os.path.realpath(base_python())  # as root the unpack user runs it (p2pd/runas.py)
    home = os.path.dirname(python)
    venv = [
        reg("pyvenv.cfg", f"home = {home}\n".encode()),
        dirm("bin"),
        sym("bin/python3", python),
        sym("bin/python", "python3"),
    ]
    env = materialize(write_tar(envs_root.parent / "venv.tar", venv), envs_root, "ok" + "0" * 62, {"env_type": "venv"})
    assert os.readlink(env / "bin" / "python3") == python
    bad = venv + [sym("bin/tool", str(outside))]
    with pytest.raises(UnsafeArchiveError, match="bin/tool"):
        materialize(write_tar(envs_root.parent / "venv2.tar", bad), envs_root, "e" * 64, {"env_type": "venv"})
    bad = venv + [sym("lib/python", python)]
    with pytest.raises(UnsafeArchiveError, match="lib/python"):
        materialize(write_tar(envs_root.parent / "venv3.tar", bad), envs_root, "e" * 64, {"env_type": "venv"})
    assert sorted(os.listdir(envs_root)) == ["ok" + "0" * 62]


def test_benign_links_and_modes_are_kept(box: tuple[Path, Path]) -> None:
    envs_root, _ = box
    members = BENIGN + [
        dirm("lib"),
        reg("lib/libfoo.so.1", b"\x7fELF...", 0o755),
        sym("lib/libfoo.so", "libfoo.so.1"),
        sym("lib64", "lib"),
        sym("share/up", "../bin/tool"),
        hard("bin/tool2", "bin/tool"),
        dirm("ro", 0o555),
        reg("ro/file", b"r", 0o444),
        reg("./dot/prefixed", b"d"),
        reg("share/data.txt", b"replaced"),  # a later member replaces an earlier one, as with tar
    ]
    env = materialize(write_tar(envs_root.parent / "ok.tar", members), envs_root, "f" * 64, {})
    assert (env / "lib64" / "libfoo.so").read_bytes() == b"\x7fELF..."
    assert (env / "share" / "up").read_bytes() == (env / "bin" / "tool").read_bytes()
    assert os.stat(env / "bin" / "tool2").st_ino == os.stat(env / "bin" / "tool").st_ino
    assert stat.S_IMODE(os.stat(env / "bin" / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(env / "ro").st_mode) == 0o755  # owner keeps write: the env stays removable
    assert (env / "dot" / "prefixed").read_bytes() == b"d"
    assert (env / "share" / "data.txt").read_bytes() == b"replaced"


# --------------------------------------------------------------------------- bounds (issue #14 rows 8, 12)
def test_a_decompression_bomb_is_refused_by_ratio(box: tuple[Path, Path]) -> None:
    """A few KB of zstd that unpack to 100 MiB of zeros: refused past 100x, nothing left behind."""
    envs_root, _ = box
    archive = write_tar(envs_root.parent / "bomb.tar.zst", [*BENIGN, reg("lib/zeros", bytes(100 << 20))], "tar.zst")
    assert archive.stat().st_size < 64 << 10
    with pytest.raises(EnvPackError, match=r"more than .* bytes \(100x its .*decompression bomb"):
        materialize(archive, envs_root, "e" * 64, {})
    assert os.listdir(envs_root) == []


def test_more_than_the_declared_unpacked_size_is_refused(box: tuple[Path, Path]) -> None:
    envs_root, _ = box
    members = [*BENIGN, reg("lib/big", os.urandom(UNPACKED_SLACK_BYTES + 1))]
    archive = write_tar(envs_root.parent / "env.tar", members)
    with pytest.raises(EnvPackError, match="lib/big.*manifest declares 10 bytes"):
        materialize(archive, envs_root, "e" * 64, {"unpacked_size": "10"})
    assert os.listdir(envs_root) == []
    assert materialize(archive, envs_root, "e" * 64, {"unpacked_size": str(UNPACKED_SLACK_BYTES)}).is_dir()


@pytest.mark.parametrize("bad", ["-1", "lots"])
def test_a_malformed_declared_size_is_refused(box: tuple[Path, Path], bad: str) -> None:
    envs_root, _ = box
    archive = write_tar(envs_root.parent / "env.tar", BENIGN)
    with pytest.raises(EnvPackError, match="unpacked_size"):
        materialize(archive, envs_root, "e" * 64, {"unpacked_size": bad})


def test_not_enough_free_space_is_refused_before_writing(
    box: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    envs_root, _ = box
    archive = write_tar(envs_root.parent / "env.tar", BENIGN)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=300 << 20))
    with pytest.raises(EnvPackError, match="not enough space .* free space"):
        materialize(archive, envs_root, "e" * 64, {"unpacked_size": str(100 << 20)})
    assert os.listdir(envs_root) == []


def test_world_and_group_writable_modes_are_normalised(box: tuple[Path, Path]) -> None:
    envs_root, _ = box
    members = [dirm("pub", 0o777), reg("pub/f", b"x", 0o666), reg("bin/run", b"#!/bin/sh\n", 0o777)]
    env = materialize(write_tar(envs_root.parent / "env.tar", members), envs_root, "e" * 64, {})
    assert stat.S_IMODE(os.stat(env / "pub").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(env / "pub" / "f").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(env / "bin" / "run").st_mode) == 0o755
