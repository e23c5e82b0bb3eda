"""Who is calling the control API, and what that caller may read and write (issue #14 row 9).

The daemon often runs as root, and its control socket is open to a group (docs/ray.md): without a
check, any member could publish a root-only file (peers then fetch its bytes) or have the daemon
place files in a directory only root may write. The kernel tells us the caller's uid and gid for a
Unix socket (SO_PEERCRED, unforgeable); its supplementary groups come from the user database.

What we chose, and why: the daemon checks the caller's rights itself, from the owner, group and
mode bits of every path component of the resolved path (`realpath`), before it reads or writes
anything for that caller. A helper process running as the caller would let the kernel decide
(ACLs included) but costs a fork and exec per request and a second code path for hashing; the
mode check is the same rule the kernel applies without ACLs, and refuses where ACLs would grant
more (a caller can always publish from a copy it owns). A caller who swaps a path component it
owns between a check and a use must not point the daemon elsewhere: `--dest` is written without
following any link (storage.py materialize), and a publish opens every component without
following links, checks these rights on the open fds and seeds hard links to the checked inodes
(p2pd/snapshot.py); `check_readable` is the path-based check of the same rule.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from p2pd.errors import ErrorCode, P2pdError

_UCRED = struct.Struct("3i")  # pid, uid, gid (struct ucred)
R, W, X = 4, 2, 1


@dataclass(frozen=True)
class Caller:
    """A control-API client as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Caller | None:
        """The peer of a connected Unix socket; None for any other socket."""
        if sock.family != socket.AF_UNIX:
            return None
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return cls(pid, uid, gid, frozenset(_groups_of(uid, gid)))

    @property
    def privileged(self) -> bool:
        """Root, or the daemon's own user: may use whatever the daemon may."""
        return self.uid == 0 or self.uid == os.geteuid()

    def may(self, st: os.stat_result, want: int) -> bool:
        """Do the mode bits give this caller `want` (R|W|X) on a file with this stat?"""
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid in self.groups:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & want == want

    def check_readable(self, path: Path) -> None:
        """Refuse (BAD_REQUEST) unless the caller could read `path`: a file, or every file of a tree."""
        if self.privileged:
            return
        real = Path(os.path.realpath(path))
        self._check_ancestors(real, path)
        st = os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            self.require(st, R | X, path, "read")
            for dirpath, dirnames, filenames in os.walk(real):
                for name in dirnames:
                    p = os.path.join(dirpath, name)
                    if os.path.islink(p):
                        continue  # os.walk does not descend into it; scan_source does not either
                    self.require(os.stat(p), R | X, Path(p), "read")
                for name in filenames:
                    p = os.path.join(dirpath, name)
                    if os.path.islink(p):  # publish follows links to files: check the target's path too
                        self.check_readable(Path(p))
                    else:
                        self.require(os.stat(p), R, Path(p), "read")
        else:
            self.require(st, R, path, "read")

    def check_writable_dest(self, dest: Path) -> None:
        """Refuse (BAD_REQUEST) unless the caller could create `dest` or write into it."""
        if self.privileged:
            return
        probe = dest
        while not os.path.lexists(probe) and probe != probe.parent:
            probe = probe.parent
        real = Path(os.path.realpath(probe))
        self._check_ancestors(real, probe)
        st = os.stat(real)
        if not stat.S_ISDIR(st.st_mode):
            raise P2pdError(ErrorCode.BAD_REQUEST, f"{probe} is not a directory: pick another --dest")
        self.require(st, W | X, probe, "write into")

    def _check_ancestors(self, real: Path, shown: Path) -> None:
        for parent in reversed(real.parents):
            self.require(os.stat(parent), X, shown, "reach")

    def require(self, st: os.stat_result, want: int, path: Path, what: str) -> None:
        if not self.may(st, want):
            raise P2pdError(
                ErrorCode.BAD_REQUEST,
                f"permission denied: uid {self.uid} may not {what} {path}; the daemon acts with its caller's rights",
            )


def _groups_of(uid: int, gid: int) -> list[int]:
    """The caller's groups: its primary gid and, if the user database knows it, its supplementary ones."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return [gid]
    try:
        return os.getgrouplist(name, gid)
    except OSError:
        return [gid]
