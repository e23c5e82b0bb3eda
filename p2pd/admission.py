"""Which incoming peer connections a node takes: caps in total and per source address, and its fd limit.

Anyone who can reach the peer port can open connections; each costs a descriptor, a few tasks and
buffers. Without a cap, 1,500 idle connections took every fd of a node under `ulimit -n 1024`
(issue #14 row 4): its control socket stopped answering and real fetches hung. A connection over
either cap is closed as soon as it is accepted, before a byte of it is read, so refusing costs next
to nothing. No I/O here besides `raise_fd_limit`, which the daemon calls once at start.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)
FD_RESERVE = 64  # descriptors kept for the control socket, the tracker, journals and the store's LRU


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (no privilege needed); returns the soft limit now.

    Distributions start services at 1,024 fds while allowing far more: a node serving hundreds of
    peers and files needs them, and the hard limit is what the administrator allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:  # a container may forbid it: keep the limit we have
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft


def incoming_cap(configured: int, fd_limit: int) -> int:
    """The total cap actually used: the configured one, or half the fds (less a reserve) if fewer."""
    return max(1, min(configured, (fd_limit - FD_RESERVE) // 2))


class Admission:
    """Counts incoming connections by source address; `admit` says whether one more may stay."""

    def __init__(self, max_total: int, max_per_addr: int) -> None:
        self.max_total = max_total
        self.max_per_addr = max_per_addr
        self.total = 0
        self.by_addr: dict[str, int] = {}
        self.refused = 0  # connections closed at once for a cap (shown in status)

    def admit(self, host: str) -> str | None:
        """Count the connection in and return None, or return why it is refused (not counted)."""
        if self.total >= self.max_total:
            self.refused += 1
            return f"{self.total} incoming connections already (the cap)"
        n = self.by_addr.get(host, 0)
        if n >= self.max_per_addr:
            self.refused += 1
            return f"{n} connections from {host} already (the per-address cap)"
        self.total += 1
        self.by_addr[host] = n + 1
        return None

    def release(self, host: str) -> None:
        """An admitted connection ended."""
        n = self.by_addr.get(host, 0)
        if n <= 1:
            self.by_addr.pop(host, None)
        else:
            self.by_addr[host] = n - 1
        self.total = max(0, self.total - 1)
