"""An env archive's code never runs as root (p2pd/runas.py, issue #14).

The archives here are the real conda-pack env of the session (tests/env/conftest.py) with a spy added:
conda-unpack and a ``.pth`` file (run by the env's python at the version check) record the uid they ran
as in a directory every user may write; conda-unpack also tries what a hostile env would (a setuid bit,
a root-only file, a symlink out of the env).
"""

from __future__ import annotations

import io
import os
import pwd
import re
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from condabuild import Packed

from p2pd import runas
from p2pd.envpack import EnvPackError, materialize

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the drop to an unpack user happens only as root")


@pytest.fixture
def spy_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="p2pd-spy-"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def with_spy(archive: Path, out: Path, unpack_code: str, pth_code: str | None) -> Path:
    """A copy of `archive` (plain tar) whose conda-unpack starts with `unpack_code`, plus a .pth file."""
    with tarfile.open(archive) as src, tarfile.open(out, "w") as dst:
        site = ""
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.name.endswith("bin/conda-unpack") and data is not None:
                first, _, rest = data.partition(b"\n")
                data = first + b"\n" + unpack_code.encode() + b"\n" + rest
                m.size = len(data)
            found = re.match(r"(.*lib/python[0-9.]+/site-packages)/", m.name)
            site = site or (found.group(1) if found else "")
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
        if pth_code is not None:
            assert site, "the env has no site-packages"
            body = pth_code.encode() + b"\n"
            info = tarfile.TarInfo(f"{site}/zz_spy.pth")
            info.size, info.mode = len(body), 0o644
            dst.addfile(info, io.BytesIO(body))
    return out


@root_only
def test_conda_unpack_and_python_check_run_as_the_unpack_user(
    packed: Packed, envs_root: Path, spy_dir: Path, unpack_user: str
) -> None:
    archive, meta = packed.archives["py.tar"]
    unpack = (
        "import os\n"
        f"open({str(spy_dir / 'unpack-uid')!r}, 'w').write('%d %d %s' % (os.getuid(), os.geteuid(), os.getgroups()))\n"
        "here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n"
        "os.chmod(os.path.join(here, 'bin', 'conda-unpack'), 0o6777)\n"
        "try:\n"
        "    open('/etc/p2pd-envtest-pwned', 'w')\n"
        f"    open({str(spy_dir / 'root-write')!r}, 'w')\n"
        "except PermissionError:\n"
        "    pass\n"
    )
    pth = f"import os; open({str(spy_dir / 'check-uid')!r}, 'w').write(str(os.getuid()))"
    spied = with_spy(archive, envs_root.parent / "spied.tar", unpack, pth)
    env = materialize(spied, envs_root, "a" * 64, meta)
    uid = pwd.getpwnam(unpack_user).pw_uid
    assert (spy_dir / "unpack-uid").read_text() == f"{uid} {uid} []"
    assert (spy_dir / "check-uid").read_text() == str(uid)
    assert not (spy_dir / "root-write").exists() and not os.path.exists("/etc/p2pd-envtest-pwned")
    for p in [env, *env.rglob("*")]:
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (0, 0), f"{p} is owned by {st.st_uid}:{st.st_gid} after the unpack"
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH | stat.S_IWGRP) or stat.S_ISLNK(
            st.st_mode
        ), f"{p} has mode {oct(st.st_mode)}"


@root_only
def test_a_symlink_out_of_the_env_made_by_conda_unpack_is_refused(packed: Packed, envs_root: Path) -> None:
    archive, meta = packed.archives["py.tar"]
    unpack = (
        "import os\n"
        "here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n"
        "os.symlink('/etc/shadow', os.path.join(here, 'shadow'))\n"
    )
    spied = with_spy(archive, envs_root.parent / "escape.tar", unpack, None)
    with pytest.raises(EnvPackError, match="'shadow' a symlink to '/etc/shadow', outside the env"):
        materialize(spied, envs_root, "b" * 64, meta)
    assert [p.name for p in envs_root.iterdir()] == [], "the refused env left something behind"


@root_only
def test_no_unpack_user_refuses_envs_naming_the_option(
    packed: Packed, envs_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, meta = packed.archives["py.tar"]
    monkeypatch.setattr(runas, "DEFAULT_USER", "p2pd-no-such-user")
    with pytest.raises(EnvPackError, match="--unpack-user NAME"):
        materialize(archive, envs_root, "c" * 64, meta)
    with pytest.raises(EnvPackError, match="'p2pd-missing' .--unpack-user. does not exist"):
        materialize(archive, envs_root, "c" * 64, meta, unpack_user="p2pd-missing")
    with pytest.raises(EnvPackError, match="uid or gid 0"):
        materialize(archive, envs_root, "c" * 64, meta, unpack_user="root")
    assert not (envs_root / ("c" * 64)).exists()


@root_only
def test_an_envs_dir_the_unpack_user_cannot_reach_is_a_clear_error(packed: Packed, workdir: Path) -> None:
    archive, meta = packed.archives["py.tar"]
    private = Path(tempfile.mkdtemp(prefix="private-", dir=workdir))  # mode 0700
    with pytest.raises(EnvPackError, match=f"cannot reach {private}/envs .it may not traverse {private}."):
        materialize(archive, private / "envs", "d" * 64, meta)


def test_a_daemon_that_is_not_root_runs_the_code_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runas.os, "geteuid", lambda: 1000)
    assert runas.resolve(None) is None
    assert runas.resolve("whoever") is None
