"""Automatic node throttling, the I/O half: reads the counters every tick and sets the daemon's `auto` buckets.

The decisions are the sans-IO controller's (p2pd/protocol/autothrottle.py). This module only finds the
interface that carries p2pd's traffic (`--auto-throttle-interface`, else the one holding the listen
address, else the one the route to the tracker leaves by), reads its byte counters from /proc/net/dev (the
reading process's own network namespace, so it also works inside `ip netns exec` without a sysfs remount),
reads p2pd's own byte counters as the wire sees them (`stream_io.TRAFFIC`, less what still waits in the
sockets' send queues, plus what waits unread in their receive queues: `stream_io.LIVE_SOCKETS`), and
applies the limits as one more level of the daemon's token-bucket hierarchy in each direction. On the
download side the bucket paces our reads, so TCP's receive window slows the senders (rLEDBAT's lever,
RFC 9840, without its delay signal).

A loopback interface has nothing to share (and carries every in-process test swarm): auto-throttling
stays off there and says so in `p2pd status`.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import math
import socket
import struct
from pathlib import Path
from typing import Any

import trio

from p2pd.config import AutoThrottleConfig
from p2pd.errors import ErrorCode, P2pdError
from p2pd.protocol.autothrottle import AutoThrottle, Decision, Sample, mbit
from p2pd.protocol.ratelimit import TokenBucket
from p2pd.stream_io import LIVE_SOCKETS, TRAFFIC, LiveSockets, TrafficCounters

log = logging.getLogger(__name__)
PROC_NET_DEV = Path("/proc/net/dev")
SYS_NET = Path("/sys/class/net")
SIOCGIFADDR = 0x8915
IFF_LOOPBACK = 0x8


def read_counters(iface: str, proc_net_dev: Path = PROC_NET_DEV) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of `iface`; KeyError if this namespace has no such interface."""
    for line in proc_net_dev.read_text().splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if sep and name.strip() == iface:
            fields = rest.split()
            return int(fields[0]), int(fields[8])
    raise KeyError(iface)


def interfaces(proc_net_dev: Path = PROC_NET_DEV) -> list[str]:
    return [line.partition(":")[0].strip() for line in proc_net_dev.read_text().splitlines()[2:] if ":" in line]


def is_loopback(iface: str) -> bool:
    if iface == "lo":
        return True
    try:
        return bool(int((SYS_NET / iface / "flags").read_text().strip(), 16) & IFF_LOOPBACK)
    except (OSError, ValueError):
        return False


def interface_of(address: str) -> str | None:
    """The interface that holds `address` (IPv4 by SIOCGIFADDR, IPv6 from /proc/net/if_inet6)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        try:
            lines = Path("/proc/net/if_inet6").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            f = line.split()
            if len(f) >= 6 and ipaddress.IPv6Address(bytes.fromhex(f[0])) == ip:
                return f[5]
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            if socket.inet_ntoa(res[20:24]) == str(ip):
                return name
    return None


def address_towards(host: str, port: int) -> str | None:
    """Our source address for packets to host:port (a connected UDP socket sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                return str(s.getsockname()[0])
        except OSError:
            continue
    return None


def check_interface(cfg: AutoThrottleConfig) -> None:
    """A named interface must exist (checked at start, before anything else, so the error comes at once)."""
    if not (cfg.enabled and cfg.interface):
        return
    try:
        read_counters(cfg.interface)
    except (KeyError, OSError):
        raise P2pdError(
            ErrorCode.BAD_REQUEST,
            f"--auto-throttle-interface {cfg.interface}: no such network interface here "
            f"(this host has {', '.join(interfaces()) or 'none'}); name one of them or leave it out",
        ) from None


def choose_interface(cfg: AutoThrottleConfig, listen_host: str, trackers: list[tuple[str, int]]) -> str | None:
    """The interface p2pd's traffic crosses; None if none could be found. A named one must exist."""
    if cfg.interface:
        check_interface(cfg)
        return cfg.interface
    if listen_host not in ("", "0.0.0.0", "::"):
        try:
            found = interface_of(listen_host)
        except ValueError:
            found = None
        if found:
            return found
    for host, port in trackers:
        local = address_towards(host, port)
        if local:
            found = interface_of(local)
            if found:
                return found
    return None


class AutoThrottler:
    """Runs the controller every tick and sets the two `auto` buckets; `status()` says what it does and why."""

    def __init__(
        self,
        cfg: AutoThrottleConfig,
        egress: TokenBucket,
        ingress: TokenBucket,
        traffic: TrafficCounters = TRAFFIC,
        live: LiveSockets = LIVE_SOCKETS,
        proc_net_dev: Path = PROC_NET_DEV,
    ) -> None:
        self.cfg = cfg
        self.egress_bucket = egress
        self.ingress_bucket = ingress
        self.traffic = traffic
        self.live = live
        self._own = (0, 0)  # (rx, tx) of the last sample: a socket closed with bytes queued must not count back
        self.proc_net_dev = proc_net_dev
        self.interface: str | None = None
        self.off_reason = "starting" if cfg.enabled else "off (--auto-throttle off)"
        self.controller: AutoThrottle | None = None
        self.queued = (0, 0)  # (unsent, unread) bytes in the peer sockets' queues at the last tick

    def status(self) -> dict[str, Any]:
        c = self.controller
        if c is None:
            return {"state": "off", "why": self.off_reason, "interface": self.interface}
        eg, ing = c.egress.decision, c.ingress.decision
        state = "yielding" if "yielding" in (eg.state, ing.state) else eg.state
        return {
            "state": state,
            "interface": self.interface,
            "egress": eg.to_json(),
            "ingress": ing.to_json(),
            "queued": {"unsent": self.queued[0], "unread": self.queued[1]},
        }

    def _sample(self, iface: str) -> Sample:
        rx, tx = read_counters(iface, self.proc_net_dev)
        unsent, unread = self.queued = self.live.queued()
        # p2pd's bytes when they cross the wire, as the interface counts them: written ones still in a send queue
        # have not left yet, arrived ones still in a receive queue have (the queues are MBs, filled in bursts), and
        # the ones TCP retransmitted crossed twice
        own_rx = max(self._own[0], self.traffic.received + unread)
        own_tx = max(self._own[1], self.traffic.sent - unsent + self.live.retransmitted)
        self._own = (own_rx, own_tx)
        # (closed sockets not yet collected count too: a floor a little high for a tick is safe, one too low is not)
        return Sample(rx, tx, own_rx, own_tx, connections=len(self.live))

    async def run(
        self,
        listen_host: str,
        trackers: list[tuple[str, int]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if not self.cfg.enabled:
            task_status.started()
            return
        iface = await trio.to_thread.run_sync(choose_interface, self.cfg, listen_host, trackers)
        self.interface = iface
        if iface is None:
            self.off_reason = "no interface found for the route to the tracker (name one: --auto-throttle-interface)"
            log.warning("auto-throttle off: %s", self.off_reason)
            task_status.started()
            return
        if is_loopback(iface):
            self.off_reason = f"{iface} is a loopback interface: no link to share"
            log.info("auto-throttle off: %s", self.off_reason)
            task_status.started()
            return
        now = trio.current_time()
        ctl = self.controller = AutoThrottle(self.cfg, now)
        ctl.tick(now, self._sample(iface))
        log.info(
            "auto-throttle on %s (link capacity %s, reserve %s)",
            iface,
            mbit(self.cfg.link_capacity) if self.cfg.link_capacity else "learned",
            mbit(self.cfg.reserve_rate) if self.cfg.reserve_rate else f"{self.cfg.reserve_fraction:.0%}",
        )
        task_status.started()
        states = ("learning", "learning")
        while True:
            await trio.sleep(self.cfg.tick)
            now = trio.current_time()
            try:
                sample = self._sample(iface)
            except (KeyError, OSError) as e:  # the interface went away: no limit rather than a stale one
                self._apply(self.egress_bucket, math.inf, now)
                self._apply(self.ingress_bucket, math.inf, now)
                self.controller = None
                self.off_reason = f"cannot read the counters of {iface} ({e!r}); retrying"
                log.warning("auto-throttle paused: %s", self.off_reason)
                await trio.sleep(5.0)
                ctl = self.controller = AutoThrottle(self.cfg, trio.current_time())
                continue
            eg, ing = ctl.tick(now, sample)
            self._apply(self.egress_bucket, eg.limit, now)
            self._apply(self.ingress_bucket, ing.limit, now)
            if (eg.state, ing.state) != states:
                _log_change("upload", states[0], eg)
                _log_change("download", states[1], ing)
                states = (eg.state, ing.state)

    @staticmethod
    def _apply(bucket: TokenBucket, limit: float, now: float) -> None:
        if limit != bucket.rate:
            bucket.set_rate(limit, now=now)


def _log_change(direction: str, before: str, d: Decision) -> None:
    if before == d.state:
        return
    if d.state == "yielding":
        log.info("auto-throttle: %s yields to %s (limit %s)", direction, d.why, mbit(d.limit))
    elif before == "yielding":
        log.info("auto-throttle: %s unlimited again (%s)", direction, d.why)
    else:
        log.info("auto-throttle: %s %s, link capacity %s", direction, d.state, mbit(d.capacity))
