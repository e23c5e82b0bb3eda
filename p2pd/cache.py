"""The node's cache of fetched artifacts: what is in it, what may go, and what goes when room is needed.

What the cache holds: artifacts fetched into DATA_DIR/cache (and downloads in DATA_DIR/staging, counted at
their full size from the start, since their files are preallocated). Published artifacts are seeded in
place from the publisher's own files: they are listed but never counted and never deleted.

Eviction (`--cache-max`): before a download starts, if the cache plus the new artifact would pass the cap
(the high watermark), the least recently used artifacts that may go are evicted until it fits under the
low watermark (`cache_low` of the cap), so that a node fetching one artifact after another evicts in
batches instead of once per fetch. An artifact may go when it is complete, in the cache, not pinned, not
leased (the Ray plugin leases what its workers use) and no local request is using it. The same happens,
cap or not, when the disk has not enough free space for the download: it evicts before failing with a
full disk. Evicting an artifact stops serving it (peers get GOODBYE after the piece being sent), deletes
its files and tells the tracker at once.

Pins and last use are kept in DATA_DIR/cache-index.json (rewritten atomically); leases are in memory
only, with a time to live their holders renew (a restarted daemon forgets them within one TTL).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pd.errors import ErrorCode, P2pdError
from p2pd.storage import Catalog, atomic_write
from p2pd.units import format_size, parse_size

log = logging.getLogger(__name__)

INDEX = "cache-index.json"
MAX_LEASE_TTL = 7 * 24 * 3600.0  # a lease is renewed by its holder; one that asks for longer is refused


def parse_cache_max(text: str, data_dir: Path) -> int:
    """`--cache-max`: a SIZE (`500GiB`) or a share of the data dir's filesystem (`80%`, `0.8`)."""
    t = text.strip()
    try:
        if t.endswith("%"):
            share = float(t[:-1]) / 100
        elif "." in t and t.replace(".", "", 1).isdigit():
            share = float(t)
        else:
            return parse_size(t)
    except ValueError as e:
        raise ValueError(f"--cache-max: {e}") from None
    if not 0 < share <= 1:
        raise ValueError(f"--cache-max: {text!r}: a share of the disk is between 0% and 100% (or 0 and 1)")
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).total * share)


@dataclass
class Entry:
    last_used: float = 0.0  # wall-clock seconds (shown to people, compared across restarts)
    pinned: bool = False


class CacheIndex:
    """Pins and last use of every artifact, persisted in the data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / INDEX
        self.entries: dict[str, Entry] = {}
        try:
            raw = json.loads(self.path.read_bytes())
            for aid, e in raw.items():
                self.entries[str(aid)] = Entry(float(e.get("last_used", 0.0)), bool(e.get("pinned", False)))
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError, OSError) as e:  # our own file, damaged: pins are lost, said once
            log.error("ignoring damaged %s (pins and last-use times start afresh): %s", self.path, e)

    def get(self, aid: str) -> Entry:
        return self.entries.get(aid) or Entry()

    def touch(self, aid: str, now: float) -> None:
        self.entries.setdefault(aid, Entry()).last_used = now
        self.save()

    def set_pinned(self, aid: str, pinned: bool) -> None:
        self.entries.setdefault(aid, Entry()).pinned = pinned
        self.save()

    def forget(self, aid: str) -> None:
        if self.entries.pop(aid, None) is not None:
            self.save()

    def save(self) -> None:
        doc = {aid: {"last_used": e.last_used, "pinned": e.pinned} for aid, e in self.entries.items()}
        atomic_write(self.path, json.dumps(doc, sort_keys=True).encode())


class Leases:
    """Who uses which artifact now (holder -> expiry, on the daemon's clock)."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, float]] = {}

    def hold(self, aid: str, holder: str, ttl: float, now: float) -> None:
        if not 0 < ttl <= MAX_LEASE_TTL:
            raise P2pdError(ErrorCode.BAD_REQUEST, f"lease ttl must be in (0, {MAX_LEASE_TTL:.0f}] seconds, got {ttl}")
        self.held.setdefault(aid, {})[holder] = now + ttl

    def release(self, aid: str, holder: str) -> bool:
        holders = self.held.get(aid, {})
        found = holders.pop(holder, None) is not None
        if not holders:
            self.held.pop(aid, None)
        return found

    def holders(self, aid: str, now: float) -> list[str]:
        holders = self.held.get(aid)
        if not holders:
            return []
        for h in [h for h, exp in holders.items() if exp <= now]:
            del holders[h]
        if not holders:
            del self.held[aid]
            return []
        return sorted(holders)


@dataclass(frozen=True)
class Item:
    """One artifact as the cache sees it (a snapshot taken from the daemon's swarms)."""

    artifact_id: str
    name: str
    size: int
    complete: bool
    stored: bool  # its files are in the data dir (cache or staging), not a publisher's own
    busy: bool  # a local request uses it now (fetch, unpack, placing it at --dest)


def stored_in(catalog: Catalog, root: Path) -> bool:
    return root.is_relative_to(catalog.cache) or root.is_relative_to(catalog.staging)


class Cache:
    """The eviction policy (pure: it decides, the daemon acts) plus the index and the leases it consults."""

    def __init__(self, catalog: Catalog, max_bytes: int | None, low: float) -> None:
        self.catalog = catalog
        self.max_bytes = max_bytes
        self.low = low
        self.index = CacheIndex(catalog.data_dir)
        self.leases = Leases()
        self.busy: Counter[str] = Counter()  # local requests using an artifact now
        self.evictions = 0
        self.evicted_bytes = 0

    def used(self, items: list[Item]) -> int:
        return sum(i.size for i in items if i.stored)

    def evictable(self, items: list[Item], now_mono: float) -> list[Item]:
        """Those that may go, least recently used first."""
        ok = [
            i
            for i in items
            if i.complete
            and i.stored
            and not i.busy
            and not self.index.get(i.artifact_id).pinned
            and not self.leases.holders(i.artifact_id, now_mono)
        ]
        return sorted(ok, key=lambda i: self.index.get(i.artifact_id).last_used)

    def plan(self, items: list[Item], need: int, free_disk: int, now_mono: float) -> list[Item]:
        """What to evict so that `need` more bytes fit: under the cap, and on the disk.

        Raises P2pdError(DISK_FULL) when even evicting everything that may go is not enough for the cap;
        for the disk alone it evicts what it can and lets the download try (another process may free space).
        """
        used = self.used(items)
        candidates = self.evictable(items, now_mono)
        out: list[Item] = []
        if self.max_bytes is not None and used + need > self.max_bytes:
            target = max(0, min(self.max_bytes, int(self.max_bytes * self.low)) - need)
            for i in candidates:
                if used <= target:
                    break
                out.append(i)
                used -= i.size
            if used + need > self.max_bytes:
                kept = [i for i in items if i.stored and i not in out]
                raise P2pdError(
                    ErrorCode.DISK_FULL,
                    f"no room in the cache for {format_size(need)}: --cache-max is {format_size(self.max_bytes)} and "
                    f"{format_size(used)} of it is held by artifacts that may not be evicted "
                    f"({describe_kept(kept, self, now_mono)}); `p2pd ls` shows them, `p2pd unpin`/`p2pd rm` frees them",
                )
        freed = sum(i.size for i in out)
        for i in candidates:
            if free_disk + freed >= need:
                break
            if i not in out:
                out.append(i)
                freed += i.size
        return out

    def describe(self, it: Item, now_mono: float) -> dict[str, Any]:
        e = self.index.get(it.artifact_id)
        return {
            "pinned": e.pinned,
            "last_used": e.last_used or None,
            "leased_by": self.leases.holders(it.artifact_id, now_mono),
            "in_cache": it.stored,
        }


def describe_kept(kept: list[Item], cache: Cache, now_mono: float) -> str:
    parts = []
    for i in kept[:5]:
        why = (
            "pinned"
            if cache.index.get(i.artifact_id).pinned
            else "leased"
            if cache.leases.holders(i.artifact_id, now_mono)
            else "downloading"
            if not i.complete
            else "in use"
        )
        parts.append(f"{i.name or i.artifact_id[:12]}: {why}")
    return ", ".join(parts) + (", ..." if len(kept) > 5 else "") if parts else "none"


def remove_files(catalog: Catalog, aid: str, *, stored: bool) -> None:
    """Delete what the data dir holds of an artifact (never a publisher's own files); blocking: run in a thread."""
    catalog.forget(aid)
    (catalog.artifacts / f"{aid}.manifest").unlink(missing_ok=True)
    if (catalog.published / aid).exists():  # links the daemon made, never the publisher's own names
        shutil.rmtree(catalog.published / aid)
    if not stored:
        return
    for d in (catalog.cache / aid, catalog.staging / aid, catalog.data_dir / "envs" / aid):
        if d.exists():
            shutil.rmtree(d)
    (catalog.staging / f"{aid}.journal").unlink(missing_ok=True)
    for p in catalog.staging.glob(f"{aid}.*"):
        p.unlink(missing_ok=True)
