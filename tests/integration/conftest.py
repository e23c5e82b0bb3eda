from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Cluster, fast_dir


@pytest.fixture
def workdir() -> Iterator[Path]:
    yield from fast_dir(1 << 30)


@pytest.fixture
def cluster(workdir: Path) -> Iterator[Cluster]:
    c = Cluster(workdir)
    c.start_tracker()
    try:
        yield c
    finally:
        c.close()
