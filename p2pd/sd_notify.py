"""systemd's service notification protocol (sd_notify(3)), for `Type=notify` units.

systemd passes $NOTIFY_SOCKET, an AF_UNIX datagram socket (a path, or an abstract name written with a
leading '@'); each datagram is newline-separated KEY=VALUE assignments: READY=1 (started: systemd
starts the units ordered after us), STATUS=... (shown by `systemctl status`), WATCHDOG=1 (alive, at
least every WatchdogSec, which systemd passes as $WATCHDOG_USEC), STOPPING=1. Written here instead
of depending on libsystemd: it is one sendto() per message.

Without $NOTIFY_SOCKET (not under systemd, or Type=simple) every call does nothing. A failed send is
logged once and never stops the daemon: being supervised is not a reason to stop serving.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes:
    """The sendto() address of a $NOTIFY_SOCKET value: '@name' is the abstract name b'\\0name'."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec, as sd_watchdog_enabled(3) advises), or None.

    $WATCHDOG_PID, when set, names the process meant (so a child that inherited the variables stays quiet).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = socket_address(path) if path.startswith(("/", "@")) else None
        self.watchdog_every = watchdog_interval(env) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram of KEY=VALUE lines (`send(READY=1, STATUS="serving")`); False if not sent."""
        if self.address is None:
            return False
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()) + "\n"
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, e)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING=1, STATUS=status)

    async def watchdog(self) -> None:
        """Ping WATCHDOG=1 at half of WatchdogSec for as long as the event loop runs (forever, if enabled).

        The pings come from the event loop itself, so a loop stuck in a blocking call misses them and
        systemd restarts the daemon.
        """
        if self.watchdog_every is None:
            return
        while True:
            self.send(WATCHDOG=1)
            await trio.sleep(self.watchdog_every)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
