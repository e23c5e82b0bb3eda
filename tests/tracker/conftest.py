"""Fixtures for the tracker tests (helpers live in tracker/testing.py so any test can import them).

Every process a test starts is tracked by PID and killed (then reaped) in a finalizer, even when the
test fails; temporary directories come from pytest's tmp_path.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracker.testing import Procs

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pyproject sets trio_mode = true; this keeps `pytest tests/tracker -p trio` working without it.
    for item in items:
        fn = getattr(item, "obj", None)
        if Path(str(item.fspath)).parent == HERE and fn is not None and inspect.iscoroutinefunction(fn):
            item.add_marker(pytest.mark.trio)


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Processes of one test, in a temp dir removed afterwards (their logs are printed first, so a
    failing test shows them in its captured output)."""
    with tempfile.TemporaryDirectory(prefix="p2p-tracker-test-") as tmp:
        ps = Procs(Path(tmp))
        try:
            yield ps
        finally:
            ps.kill_all()
            for p in ps.all:
                print(f"--- {' '.join(p.args)[:200]} (pid {p.pid}, exit {p.popen.returncode})")
                print(p.log()[-4000:])
