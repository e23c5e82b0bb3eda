"""Running code from an env archive as an unprivileged user (issue #14: conda-unpack, the Python check).

Why: materializing an env runs code the archive brought (conda-unpack's replacement functions, the env's
own ``bin/python`` and the ``.pth`` files it reads). Provenance checks decide *whose* envs a node unpacks;
this module makes sure that even a trusted publisher's env (or a compromised one) never runs as root.

- **Who.** A daemon running as root runs archive code as the unpack user: ``p2pd run --unpack-user NAME``
  (file key ``unpack_user``, ``$P2PD_UNPACK_USER``), else the ``p2pd`` service user when it exists, else
  envs are refused with an error naming the option. uid 0 and gid 0 are refused as unpack users. A daemon
  that is not root is already unprivileged and runs the code as itself.
- **How.** subprocess's ``user=``/``group=``/``extra_groups=[]`` (the switch happens in the forked child,
  safe with threads: materializing runs in a worker thread), umask 022, a minimal environment, its own
  session (so whatever it leaves behind in that process group is killed afterwards), and rlimits on CPU
  time, address space, open files and core dumps through util-linux ``prlimit`` when the node has it.
- **The tree.** conda-unpack rewrites files in place, so the staging tree is handed to the unpack user
  for the run (:func:`hand_over`) and taken back afterwards (:func:`take_back`): every entry is checked
  first (no devices, fifos or sockets; no hard link to a file outside the tree; no new or changed
  symlink resolving outside the tree), then chowned back to the daemon's user with modes normalised
  (no setuid/setgid/sticky bits, no group/other write), through directory fds and ``O_NOFOLLOW`` so a
  swapped path cannot redirect a chown.
- **The interpreter.** Ours may live in a 0700 directory (``/root/...``), so the env's own
  ``bin/python`` (inside the staging tree) runs the conda-unpack driver; else ours when the unpack user
  can execute it; else a system ``python3`` (the driver needs only the standard library); else a clear
  error.

Left over (docs/security.md): a process that leaves its session (``setsid``) survives the kill of the
process group; with a dedicated unpack user it can touch nothing but that user's files (the env tree is
root-owned again by then).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "p2pd"  # the service user the packages create; used when --unpack-user is not given
UMASK = 0o022
MIN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}
# rlimits of the archive's code: far above what conda-unpack or a version check needs, far below a runaway
LIMIT_AS = 32 << 30  # address space: update_prefix reads one file at a time into memory
LIMIT_NOFILE = 1024
PRLIMIT = "/usr/bin/prlimit"
_MODE_KEEP = 0o755  # no setuid/setgid/sticky, no group/other write


class RunAsError(Exception):
    """Archive code cannot be run unprivileged here; the message says what to configure."""


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user archive code runs as (only when the daemon is root)."""

    name: str
    uid: int
    gid: int


def resolve(configured: str | None) -> RunAs | None:
    """The user to run archive code as; None: as ourselves (this process is not root)."""
    if os.geteuid() != 0:
        return None
    name = configured or DEFAULT_USER
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if configured:
            raise RunAsError(
                f"the unpack user {name!r} (--unpack-user) does not exist: create it (useradd --system {name}) "
                "or name another unprivileged user"
            ) from None
        raise RunAsError(
            "this daemon runs as root and never runs an env's code (conda-unpack, its python) as root, but no "
            f"unpack user is configured and there is no {DEFAULT_USER!r} user: give one with "
            f"`p2pd run --unpack-user NAME` (or create it: useradd --system {DEFAULT_USER})"
        ) from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise RunAsError(f"the unpack user {name!r} has uid or gid 0: name an unprivileged user (--unpack-user)")
    return RunAs(name, pw.pw_uid, pw.pw_gid)


def can_execute(path: Path, who: RunAs) -> bool:
    """Whether `who` (its primary group only: extra groups are dropped) can run the file at `path`."""
    try:
        real = Path(os.path.realpath(path))
        st = os.stat(real)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and _allows(st, who, 0o1) and can_reach(real.parent, who) is None


def can_reach(directory: Path, who: RunAs) -> Path | None:
    """None when `who` can traverse every directory down to `directory`; else the first one it cannot."""
    real = Path(os.path.realpath(directory))
    for d in [*reversed(real.parents), real]:
        try:
            st = os.stat(d)
        except OSError:
            return d
        if not _allows(st, who, 0o1):
            return d
    return None


def _allows(st: os.stat_result, who: RunAs, bit: int) -> bool:
    if st.st_uid == who.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == who.gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def run(argv: Sequence[str], who: RunAs | None, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run archive code: as `who` (None: as ourselves) with a minimal environment, umask and rlimits."""
    cmd = list(argv)
    if os.path.exists(PRLIMIT):
        cmd = [PRLIMIT, f"--cpu={int(timeout)}", f"--as={LIMIT_AS}", f"--nofile={LIMIT_NOFILE}", "--core=0", "--", *cmd]
    ids: dict[str, object] = {} if who is None else {"user": who.uid, "group": who.gid, "extra_groups": []}
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=dict(MIN_ENV),
        umask=UMASK,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **ids,  # type: ignore[call-overload]
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Whatever the code left running in its session goes with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing left in the group
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def hand_over(tree: Path, who: RunAs) -> dict[str, str]:
    """Give `tree` to `who` for a run; returns its symlinks (relative path -> target) as they were."""
    links: dict[str, str] = {}
    for top, dirs, files, dfd in os.fwalk(tree, follow_symlinks=False):
        rel_top = os.path.relpath(top, tree)
        os.chown(dfd, who.uid, who.gid)
        for name in files + dirs:
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                continue  # chowned through its own fd when the walk gets there
            if stat.S_ISLNK(st.st_mode):
                links[os.path.normpath(os.path.join(rel_top, name))] = os.readlink(name, dir_fd=dfd)
            os.chown(name, who.uid, who.gid, dir_fd=dfd, follow_symlinks=False)
    return links


def take_back(tree: Path, before_links: dict[str, str], allow_outside: Sequence[str] = ()) -> None:
    """Check what the run left in `tree`, then make it ours again (uid/gid of this process), modes normalised.

    Raises RunAsError (nothing is chowned) when the run left a device, fifo or socket, a hard link to a
    file outside the tree, or a new or changed symlink that resolves outside the tree."""
    root = os.path.realpath(tree)
    names: dict[tuple[int, int], int] = {}
    nlinks: dict[tuple[int, int], int] = {}
    for top, dirs, files, dfd in os.fwalk(tree, follow_symlinks=False):
        rel_top = os.path.relpath(top, tree)
        for name in files + dirs:
            rel = os.path.normpath(os.path.join(rel_top, name))
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=dfd)
                if before_links.get(rel) != target and rel not in allow_outside:
                    real = os.path.realpath(os.path.join(tree, rel))
                    if real != root and not real.startswith(root + os.sep):
                        raise RunAsError(f"the env's code made {rel!r} a symlink to {real!r}, outside the env")
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                names[key] = names.get(key, 0) + 1
                nlinks[key] = st.st_nlink
            elif not stat.S_ISDIR(st.st_mode):
                raise RunAsError(f"the env's code left {rel!r}, which is not a file, directory or symlink")
    for key, n in nlinks.items():
        if n != names[key]:
            raise RunAsError("the env's code hard-linked a file of the env with a file outside it")
    uid, gid = os.geteuid(), os.getegid()
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for _top, dirs, files, dfd in os.fwalk(tree, follow_symlinks=False, topdown=False):
        for name in files + dirs:
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                continue
            if stat.S_ISLNK(st.st_mode):
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
                continue
            fd = os.open(name, flags, dir_fd=dfd)
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) not in names:
                    raise RunAsError(f"{name!r} in the env changed while it was taken back")
                os.fchown(fd, uid, gid)
                os.fchmod(fd, stat.S_IMODE(fst.st_mode) & _MODE_KEEP)
            finally:
                os.close(fd)
        os.fchown(dfd, uid, gid)
        os.fchmod(dfd, (stat.S_IMODE(os.fstat(dfd).st_mode) & _MODE_KEEP) | 0o700)


def interpreter(tree: Path, who: RunAs, ours: str) -> str:
    """The interpreter that runs a driver over `tree` as `who`: the env's own, else ours, else the system's."""
    own = tree / "bin" / "python"
    if os.path.lexists(own) and can_execute(own, who):
        return str(own)
    for cand in (ours, shutil.which("python3", path=MIN_ENV["PATH"])):
        if cand and can_execute(Path(cand), who):
            return cand
    raise RunAsError(
        f"the unpack user {who.name!r} can run neither the env's bin/python, nor this daemon's interpreter "
        f"({ours}), nor a python3 on {MIN_ENV['PATH']}: install a python3 every user can run (not under /root)"
    )
