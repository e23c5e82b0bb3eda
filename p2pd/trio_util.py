"""Small helpers for trio's strict exception groups."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def leaf_exceptions(eg: BaseException) -> list[BaseException]:
    if isinstance(eg, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in eg.exceptions:
            out.extend(leaf_exceptions(e))
        return out
    return [eg]


@contextmanager
def collapse_single() -> Iterator[None]:
    """Re-raise a group holding exactly one exception as that exception.

    A nursery that failed because one child raised should read, to its caller, like that child's
    error: callers then catch `StorageError` or `RpcError` as usual.
    """
    try:
        yield
    except BaseExceptionGroup as eg:
        leaves = leaf_exceptions(eg)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
