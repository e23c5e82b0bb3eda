"""The benchmark's start gate: nothing runs before GO, outputs land in the files, exit status is the command's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MODULE = """
import sys
if __name__ == "__main__":  # the gate imports the module to warm it, then runs it as __main__ on GO
    print("out:" + " ".join(sys.argv[1:]))
    print("err-line", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
"""


REPO = Path(__file__).resolve().parents[2]


def gate(tmp_path: Path, *args: str, say: str = "GO\n") -> tuple[int, str, str, str]:
    (tmp_path / "gated_cmd.py").write_text(MODULE)
    out, err = tmp_path / "o.txt", tmp_path / "e.txt"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "netsim.bench.gate",
            "--stdout",
            str(out),
            "--stderr",
            str(err),
            "--",
            sys.executable,
            "-m",
            "gated_cmd",
            *args,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    assert p.stdout is not None and p.stdin is not None
    ready = p.stdout.readline()
    p.stdin.write(say)
    p.stdin.close()
    rc = p.wait(timeout=60)
    return rc, ready, out.read_text() if out.exists() else "", err.read_text() if err.exists() else ""


@pytest.mark.parametrize("code", [0, 3])
def test_runs_on_go_with_the_commands_exit_status_and_output(tmp_path: Path, code: int) -> None:
    rc, ready, out, err = gate(tmp_path, str(code), "x")
    assert ready.strip() == "READY"
    assert rc == code
    assert out == f"out:{code} x\n" and err == "err-line\n"


def test_never_runs_the_command_without_go(tmp_path: Path) -> None:
    rc, ready, out, _ = gate(tmp_path, "0", say="")
    assert ready.strip() == "READY" and rc == 3 and out == ""
