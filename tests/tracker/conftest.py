"""Fixtures for the tracker tests (helpers live in tracker_testutil.py; processes in p2pd.cluster).

Every process a test starts belongs to the test's `LocalCluster`: stopped by PID (then reaped) at the
end, even when the test fails.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from p2pd.cluster import LocalCluster
from tests.tracker.tracker_testutil import start_redis
from tracker.store import MemoryStore, Store

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pyproject sets trio_mode = true; this keeps `pytest tests/tracker -p trio` working without it.
    for item in items:
        fn = getattr(item, "obj", None)
        if Path(str(item.fspath)).parent == HERE and fn is not None and inspect.iscoroutinefunction(fn):
            item.add_marker(pytest.mark.trio)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """Processes of one test, in a temp dir removed afterwards (their logs are printed first, so a
    failing test shows them in its captured output). The tracker's own mechanics are tested with fake
    node ids on an `--insecure` tracker; tests/tracker/test_tracker_trust.py tests a secured one."""
    with (
        tempfile.TemporaryDirectory(prefix="p2p-tracker-test-") as tmp,
        LocalCluster(Path(tmp), secure=False) as c,
    ):
        try:
            yield c
        finally:
            c.close()
            for p in c.processes:
                print(f"--- {' '.join(p.argv)[:200]} (pid {p.pid}, exit {p.returncode})")
                print(p.log_tail(4000))


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, cluster: LocalCluster) -> AsyncIterator[Store]:
    """Each store test runs on both stores (a real redis-server for the second); the heartbeat interval is
    the test module's INTERVAL, so modules that wait for expiry choose how long."""
    interval = float(request.module.INTERVAL)
    if request.param == "memory":
        yield MemoryStore(interval)
        return
    from tracker.redis_store import RedisStore

    s = await RedisStore.connect(start_redis(cluster).url, interval)
    try:
        yield s
    finally:
        await s.aclose()
