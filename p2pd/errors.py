"""The one vocabulary of failures: error codes shared by the daemon, the tracker, the CLIs and the Ray
plugin, and the reasons a peer connection closes.

A code travels on the wire as its string value (`{"error": {"code": "not_found", "message": ...}}`)
and decides what a program does with a failure (retry another tracker, use the local copy, exit with
status 4); the message is for people only and is never parsed. docs/interfaces.md lists every code
with what the user should do; tests/unit/test_errors.py keeps that table and this enum in step.

Standard library only: the Ray plugin imports this inside Ray's asyncio agent, where trio must not be.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # A field, argument or path is malformed or unusable; fix the request as the message says.
    BAD_REQUEST = "bad_request"
    # The tracker admin API refused the token; pass the right --token or $P2P_TRACKER_ADMIN_TOKEN.
    UNAUTHORIZED = "unauthorized"
    # Another p2pd holds the data dir, or the listen address is taken; stop it or pick another.
    CONFLICT = "conflict"
    # No such name, artifact or node; check the spelling (`p2p-tracker admin artifacts`) or publish first.
    NOT_FOUND = "not_found"
    # The daemon, every tracker replica or the tracker's Redis did not answer (message says which); start it.
    UNREACHABLE = "unreachable"
    # The service answered nothing within the time limit; it is up but slow or overloaded: retry.
    TIMEOUT = "timeout"
    # Not enough disk space for a download; free space or move --data-dir; the next fetch resumes.
    DISK_FULL = "disk_full"
    # Reading or writing the data dir or --dest failed otherwise; check that path and its permissions.
    STORAGE = "storage"
    # The tracker's manifest for a name does not match its artifact id, or a piece came only corrupt
    # from every peer that had it; republish from a good copy.
    INTEGRITY = "integrity"
    # A packed environment could not be packed, unpacked or run here; the message says why: repack it.
    ENV = "env"
    # The other side sent a frame or reply this version cannot use; run one p2pd version on both sides.
    PROTOCOL = "protocol"
    # An unexpected failure (a bug), or a code this version does not know; see the answering side's log.
    INTERNAL = "internal"

    @classmethod
    def decode(cls, value: object) -> ErrorCode:
        """The member a remote's code names; INTERNAL for any code this version does not know.

        A newer daemon or tracker may add codes: the call still fails, with the remote's message, and
        nothing that reads replies breaks. Codes of earlier versions map to the member that replaced them.
        """
        if isinstance(value, str):
            if value in cls._value2member_map_:
                return cls(value)
            return LEGACY_CODES.get(value, cls.INTERNAL)
        return cls.INTERNAL

    @property
    def exit_status(self) -> int:
        """The status a CLI exits with when a command fails with this code (docs/interfaces.md)."""
        return EXIT_STATUS[self]


# Spellings of earlier versions, still accepted from a remote that has not been upgraded yet.
LEGACY_CODES: dict[str, ErrorCode] = {
    "tracker_unreachable": ErrorCode.UNREACHABLE,
    "daemon_unreachable": ErrorCode.UNREACHABLE,
    "unavailable": ErrorCode.UNREACHABLE,
}

# Exit statuses of `p2pd`, `p2p-tracker` and `p2p-tracker admin`, grouped by what the user does next.
# 2 is also what the argument parser (click) exits with for a mistyped command line.
EXIT_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INTERNAL: 1,
    ErrorCode.PROTOCOL: 1,
    ErrorCode.BAD_REQUEST: 2,
    ErrorCode.UNAUTHORIZED: 2,
    ErrorCode.CONFLICT: 2,
    ErrorCode.NOT_FOUND: 3,
    ErrorCode.UNREACHABLE: 4,
    ErrorCode.TIMEOUT: 4,
    ErrorCode.DISK_FULL: 5,
    ErrorCode.STORAGE: 5,
    ErrorCode.INTEGRITY: 6,
    ErrorCode.ENV: 7,
}
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention); a download goes on in the daemon


class P2pdError(Exception):
    """A failure with a code from the vocabulary; `str()` is the one-line message for the user."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CloseReason(StrEnum):
    """Why a peer connection ended (logged, counted, and what the swarm decides on)."""

    REMOTE_CLOSED = "remote_closed"  # the peer closed the connection
    GOODBYE = "goodbye"  # the peer said GOODBYE (it is leaving, or has no use for us): nothing wrong
    STALLED = "stalled"  # no byte while our requests were pending: ask others, re-dial later
    SILENT = "silent"  # nothing at all, not even KEEPALIVE, for the idle timeout
    PROTOCOL = "protocol"  # the peer broke the protocol (malformed or unexpected frame)
    BANNED = "banned"  # the peer sent pieces that fail verification (strikes_to_ban of them): banned a while
    DUPLICATE = "duplicate"  # a second connection between the same two nodes: one of them goes
    WE_LEFT = "we_left"  # we said GOODBYE (this node stops, or the artifact is dropped)
    DOWNLOAD_STOPPED = "download_stopped"  # this artifact's download failed for good (disk full, ...)
    SOCKET_ERROR = "socket_error"  # the OS reported an error on the connection
    INTERNAL = "internal"  # a bug in p2pd: costs this connection, not the daemon

    @property
    def expected(self) -> bool:
        """An ordinary end of a connection, not worth a log line at INFO."""
        return self in (CloseReason.GOODBYE, CloseReason.WE_LEFT, CloseReason.DUPLICATE)
