"""The cache's eviction policy and its index (p2pd/cache.py): pure decisions, no daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pd.cache import Cache, CacheIndex, Item, Leases, parse_cache_max
from p2pd.errors import ErrorCode, P2pdError
from p2pd.storage import Catalog

MiB = 1 << 20
BIG_DISK = 1 << 50


def item(aid: str, size: int = 30 * MiB, *, complete: bool = True, stored: bool = True, busy: bool = False) -> Item:
    return Item(aid, f"{aid}:v1", size, complete, stored, busy)


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(Catalog(tmp_path), 100 * MiB, 0.9)


def test_least_recently_used_go_first_down_to_the_low_watermark(cache: Cache) -> None:
    items = [item("a"), item("b"), item("c")]
    for t, aid in enumerate(["b", "c", "a"]):  # b is the least recently used, then c
        cache.index.touch(aid, 1000.0 + t)
    assert cache.plan(items, 10 * MiB, BIG_DISK, 0.0) == []  # 90 + 10 fits under the cap
    assert [i.artifact_id for i in cache.plan(items, 30 * MiB, BIG_DISK, 0.0)] == ["b"]  # 60 + 30 <= 90
    # 90 + 40: down to 90 - 40 = 50 -> two go, not one
    assert [i.artifact_id for i in cache.plan(items, 40 * MiB, BIG_DISK, 0.0)] == ["b", "c"]


def test_pinned_leased_busy_downloading_and_published_never_go(cache: Cache) -> None:
    items = [
        item("pinned"),
        item("leased"),
        item("busy", busy=True),
        item("partial", complete=False),
        item("published", stored=False),
        item("idle", 5 * MiB),
    ]
    cache.index.set_pinned("pinned", True)
    cache.leases.hold("leased", "job-1", 60, now=0.0)
    assert cache.used(items) == 125 * MiB  # the published one is not the cache's
    with pytest.raises(P2pdError) as e:
        cache.plan(items, 10 * MiB, BIG_DISK, 1.0)
    assert e.value.code == ErrorCode.DISK_FULL
    assert "pinned:v1: pinned" in e.value.message and "leased:v1: leased" in e.value.message
    # once the lease expires, the leased one may go (with the idle one, least recently used first)
    assert {i.artifact_id for i in cache.plan(items, 10 * MiB, BIG_DISK, 61.0)} == {"idle", "leased"}


def test_no_cap_still_evicts_for_a_full_disk(tmp_path: Path) -> None:
    c = Cache(Catalog(tmp_path), None, 0.9)
    items = [item("a"), item("b")]
    c.index.touch("a", 5.0)
    c.index.touch("b", 1.0)
    assert c.plan(items, 30 * MiB, 100 * MiB, 0.0) == []
    assert [i.artifact_id for i in c.plan(items, 30 * MiB, 10 * MiB, 0.0)] == ["b"]
    assert [i.artifact_id for i in c.plan(items, 80 * MiB, 10 * MiB, 0.0)] == ["b", "a"]
    assert len(c.plan(items, 200 * MiB, 10 * MiB, 0.0)) == 2  # not enough even so: the download tries anyway


def test_index_persists_and_survives_damage(tmp_path: Path) -> None:
    idx = CacheIndex(tmp_path)
    idx.touch("a", 12.5)
    idx.set_pinned("b", True)
    again = CacheIndex(tmp_path)
    assert again.get("a").last_used == 12.5 and again.get("b").pinned and not again.get("c").pinned
    (tmp_path / "cache-index.json").write_text("{not json")
    assert CacheIndex(tmp_path).entries == {}


def test_leases_expire_and_release() -> None:
    leases = Leases()
    leases.hold("a", "j1", 10, now=0.0)
    leases.hold("a", "j2", 20, now=0.0)
    assert leases.holders("a", 5.0) == ["j1", "j2"] and leases.holders("a", 15.0) == ["j2"]
    assert leases.release("a", "j2") and not leases.release("a", "j2") and leases.holders("a", 0.0) == []
    with pytest.raises(P2pdError):
        leases.hold("a", "j", 0, now=0.0)


def test_cache_max_is_a_size_or_a_share_of_the_disk(tmp_path: Path) -> None:
    import shutil

    total = shutil.disk_usage(tmp_path).total
    assert parse_cache_max("100MiB", tmp_path) == 100 * MiB
    assert parse_cache_max("50%", tmp_path / "not-yet") == total // 2
    assert parse_cache_max("0.25", tmp_path) == int(total * 0.25)
    for bad in ("150%", "0.0", "lots"):
        with pytest.raises(ValueError, match="--cache-max"):
            parse_cache_max(bad, tmp_path)
