"""The swarm bench's CPU accounting: a run whose clients need the machine's cores is CPU-bound (issue #15)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from netsim.bench.harness import cpu_seconds_by_root, cpu_seconds_tree, machine_busy_seconds

SPIN = "import time\nwhile time.process_time() < 0.3:\n    pass\nprint('spun', flush=True)\ntime.sleep(60)\n"


@contextmanager
def spinner() -> Iterator[int]:
    """A shell whose python child spent 0.3 s of CPU and now sleeps (the daemons run under wrappers, setpriv and
    ip netns exec: their CPU is in the descendants of the PID we hold); its PID, the process group killed after."""
    sh = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" -c "$0"; true', SPIN],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert sh.stdout is not None
        assert sh.stdout.readline().strip() == "spun"
        yield sh.pid
    finally:
        os.killpg(sh.pid, signal.SIGKILL)  # the group this test started: sh and its python child
        sh.wait(timeout=10)


def test_the_cpu_of_a_process_tree_counts_its_grandchildren() -> None:
    with spinner() as pid:
        used = cpu_seconds_tree([pid])
        assert 0.25 <= used < 5.0, used  # (clock ticks: 10 ms grain)
        assert cpu_seconds_tree([]) == 0.0


def test_the_cpu_by_root_names_each_tree_apart_and_an_exited_one_counts_zero() -> None:
    # the NAT swarm's timeline: each daemon's CPU apart from the others', from one scan of /proc
    idle = subprocess.Popen(["sleep", "60"], start_new_session=True)
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    try:
        with spinner() as pid:
            used = cpu_seconds_by_root({"spinner": pid, "sleeper": idle.pid, "gone": gone.pid})
            assert 0.25 <= used["spinner"] < 5.0, used
            assert used["sleeper"] < 0.1 and used["gone"] == 0.0, used
    finally:
        idle.kill()
        idle.wait(timeout=10)


def test_machine_busy_seconds_grow_with_work() -> None:
    before = machine_busy_seconds()
    subprocess.run([sys.executable, "-c", "import time\nwhile time.process_time() < 0.2:\n    pass\n"], check=True)
    assert machine_busy_seconds() - before >= 0.15  # (clock ticks: 10 ms grain)
