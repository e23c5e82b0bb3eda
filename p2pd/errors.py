"""The one vocabulary of failures: why a peer connection closed.

Code branches on these members, never on message text; the text beside a reason is for people.
"""

from __future__ import annotations

import enum


class CloseReason(enum.StrEnum):
    """Why a peer connection ended (logged, counted, and what the swarm decides on)."""

    REMOTE_CLOSED = "remote_closed"  # the peer closed the connection
    GOODBYE = "goodbye"  # the peer said GOODBYE (it is leaving, or has no use for us): nothing wrong
    STALLED = "stalled"  # no byte while our requests were pending: ask others, re-dial later
    SILENT = "silent"  # nothing at all, not even KEEPALIVE, for the idle timeout
    PROTOCOL = "protocol"  # the peer broke the protocol (malformed or unexpected frame)
    BANNED = "banned"  # the peer sent a piece that fails verification
    DUPLICATE = "duplicate"  # a second connection between the same two nodes: one of them goes
    WE_LEFT = "we_left"  # we said GOODBYE (this node stops, or the artifact is dropped)
    DOWNLOAD_STOPPED = "download_stopped"  # this artifact's download failed for good (disk full, ...)
    SOCKET_ERROR = "socket_error"  # the OS reported an error on the connection
    INTERNAL = "internal"  # a bug in p2pd: costs this connection, not the daemon

    @property
    def expected(self) -> bool:
        """An ordinary end of a connection, not worth a log line at INFO."""
        return self in (CloseReason.GOODBYE, CloseReason.WE_LEFT, CloseReason.DUPLICATE)
