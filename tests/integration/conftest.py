from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.cluster import LocalCluster, scratch_dir


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_dir(1 << 30, prefix="p2pd-test-") as d:
        yield d


@pytest.fixture
def cluster(workdir: Path) -> Iterator[LocalCluster]:
    with LocalCluster(workdir) as c:
        c.start_tracker()
        yield c
