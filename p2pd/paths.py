"""Where a node's daemon keeps its data and its control socket: one rule for every client.

The CLI, the daemon and the Ray plugin (which runs in Ray's asyncio agent and must not import trio)
all find the daemon this way, so this module uses the standard library only.
Rule: an explicit socket, else an explicit data dir, else $P2PD_SOCKET, else $P2PD_DATA_DIR, else the
default data dir (/var/lib/p2pd as root, ~/.local/share/p2pd otherwise). The environment is read at
call time, so one process can talk to several daemons (tests do).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "p2pd.sock"
ROOT_DATA_DIR = Path("/var/lib/p2pd")


def system_data_dir() -> Path:
    """The data dir when nothing is configured: system-wide as root, per user otherwise."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ROOT_DATA_DIR
    return Path.home() / ".local" / "share" / "p2pd"


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env["P2PD_DATA_DIR"]) if env.get("P2PD_DATA_DIR") else system_data_dir()


def socket_path(
    socket: Path | None = None, data_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    if socket is not None:
        return socket
    if data_dir is not None:
        return data_dir / SOCKET_NAME
    env = os.environ if environ is None else environ
    if env.get("P2PD_SOCKET"):
        return Path(env["P2PD_SOCKET"])
    return default_data_dir(env) / SOCKET_NAME
