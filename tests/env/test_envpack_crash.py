"""Crash safety: a materialization killed or failing at any point leaves nothing that looks ready,
and the next call (or cleanup_stale at daemon start) clears the debris and succeeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from condabuild import Packed

from p2pd import envpack
from p2pd.envpack import cleanup_stale, env_ready, materialize

REPO = Path(__file__).resolve().parents[2]

KILLER = r"""
import os, signal, sys
from p2pd.envpack import materialize
archive, root, aid, fmt, kill_at = sys.argv[1:6]
def progress(done, total):
    # "mid": part of the archive read; "end": extraction done, relocation about to start
    if (kill_at == "mid" and done >= total // 3) or (kill_at == "end" and done == total):
        os.kill(os.getpid(), signal.SIGKILL)
meta = {"env_type": "conda", "env_format": fmt}
materialize(archive, root, aid, meta, progress=progress, unpack_user=os.environ.get("P2PD_UNPACK_USER"))
print("finished without being killed")
"""


def kill_during_materialize(archive: Path, envs_root: Path, artifact_id: str, fmt: str, kill_at: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-c", KILLER, str(archive), str(envs_root), artifact_id, fmt, kill_at],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == -signal.SIGKILL, f"expected SIGKILL, got {r.returncode}: {r.stdout}{r.stderr}"


@pytest.mark.parametrize("kill_at", ["mid", "end"])
def test_killed_process_leaves_nothing_ready_and_retry_succeeds(packed: Packed, envs_root: Path, kill_at: str) -> None:
    archive, meta = packed.archives["py.tar"]
    aid = "1" * 64
    kill_during_materialize(archive, envs_root, aid, "tar", kill_at)
    left = os.listdir(envs_root)
    assert any(n.startswith(f".tmp-{aid}-") for n in left), f"expected a partial tmp dir, found {left}"
    assert aid not in left and env_ready(envs_root, aid) is None
    env = materialize(archive, envs_root, aid, meta)
    assert sorted(os.listdir(envs_root)) == [aid], "the retry did not clear the crashed attempt's debris"
    out = subprocess.run(
        [env / "bin" / "python", "-c", "import sys, hellopip; print(sys.prefix)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == str(env), out.stderr


def test_exception_after_partial_extraction_cleans_up(packed: Packed, envs_root: Path) -> None:
    archive, meta = packed.archives["py.tar"]
    aid = "2" * 64

    class Injected(RuntimeError):
        pass

    def failing(done: int, total: int) -> None:
        if done >= total // 2:
            assert any(envs_root.glob(f".tmp-{aid}-*/lib")), "expected files extracted by now"
            raise Injected("disk went away")

    with pytest.raises(Injected):
        materialize(archive, envs_root, aid, meta, progress=failing)
    assert os.listdir(envs_root) == [], "partial extraction or lock left behind"
    assert materialize(archive, envs_root, aid, meta) == envs_root / aid


def test_unmarked_env_dir_is_not_ready_and_gets_replaced(packed: Packed, envs_root: Path) -> None:
    """A directory under the final name without the marker (e.g. copied in by hand) is not trusted."""
    archive, meta = packed.archives["hello.tar"]
    aid = "3" * 64
    (envs_root / aid / "bin").mkdir(parents=True)
    assert env_ready(envs_root, aid) is None
    env = materialize(archive, envs_root, aid, meta)
    assert (env / "bin" / "hello").is_file() and env_ready(envs_root, aid) == env


def test_cleanup_stale_skips_ids_in_progress(packed: Packed, envs_root: Path) -> None:
    archive, _ = packed.archives["py.tar"]
    crashed, busy = "4" * 64, "5" * 64
    kill_during_materialize(archive, envs_root, crashed, "tar", "mid")
    (envs_root / f".tmp-{busy}-0123456789ab").mkdir()
    with envpack._id_lock(envs_root, busy) as held:  # another materializer holds this id
        assert held
        removed = cleanup_stale(envs_root)
        assert [p.name.startswith(f".tmp-{crashed}-") for p in removed] == [True]
        assert sorted(os.listdir(envs_root)) == sorted([f".tmp-{busy}-0123456789ab", f".{busy}.lock"])
    assert cleanup_stale(envs_root) == [envs_root / f".tmp-{busy}-0123456789ab"]
    assert os.listdir(envs_root) == []
