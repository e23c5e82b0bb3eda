"""Emulated networks of real processes: Linux network namespaces, veth pairs, bridges, tc tbf, iptables.

Why it is built this way:
- Every object lives in a namespace whose name starts with a per-run prefix (`p2e<pid hex>x<n>`), so concurrent
  runs (other engineers, CI, pytest-xdist) never collide, and leftovers of a killed run can be told apart and
  reaped (`python -m netsim.emu cleanup`). Nothing is created in the caller's namespace: veth pairs are created
  inside the switch namespace with their peer end moved straight into the host namespace.
- Nothing leaves the namespaces: hosts get addresses in 198.18.0.0/15 (RFC 2544, reserved for benchmarking), and
  no namespace has a link to the outside, so no packet can reach a real network.
- This kernel has no netem, so links are shaped with tbf only (rate, no delay), once per direction: tbf on the
  host-side veth shapes the upload, tbf on the switch-side veth shapes the download. Random loss, when asked for,
  is an iptables `statistic` DROP on the receiving host's INPUT (drops in OUTPUT would be reported to the sender as
  a local error, not lost on a wire).
- Cleanup always runs (context manager, SIGTERM/SIGHUP turned into an exception, SIGINT is KeyboardInterrupt) and
  ends only the processes this topology started (by PID) plus any process left inside its own namespaces, then
  deletes the namespaces; children are spawned with PR_SET_PDEATHSIG=SIGKILL so a SIGKILLed driver leaves no
  running daemons behind.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import IO, Any

PREFIX_ROOT = "p2e"
PREFIX_RE = re.compile(rf"^{PREFIX_ROOT}([0-9a-f]+)x([0-9a-f]+)-")
DEFAULT_NET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking range, never routed
TBF_LATENCY_MS = 20
_counter = itertools.count()
_sig_lock = threading.Lock()
_sig_depth = 0
_sig_saved: dict[int, Any] = {}


class EmuError(RuntimeError):
    """A command that builds or tears down the emulated network failed (message carries its stderr)."""


class Terminated(BaseException):
    """SIGTERM/SIGHUP arrived while a topology was up; raised so that `with` blocks unwind and clean up."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum


def new_prefix() -> str:
    """A name prefix unique on this machine while this process lives: pid and a per-process counter."""
    return f"{PREFIX_ROOT}{os.getpid():x}x{next(_counter):x}"


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a setup command; failures become EmuError with the command and its stderr (never silently ignored)."""
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EmuError(f"{' '.join(argv)}: {e}") from e
    if check and cp.returncode != 0:
        raise EmuError(f"{' '.join(argv)}: exit {cp.returncode}: {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def list_namespaces() -> list[str]:
    """Names of all network namespaces known to `ip netns` (first word of each line)."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    """PIDs of the processes whose network namespace is `ns`."""
    cp = _run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_and_wait(pids: Sequence[int], deadline_s: float = 3.0) -> None:
    """SIGKILL the given PIDs (processes inside our own namespaces) and wait until they are gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + deadline_s
    while any(_pid_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.02)


def tbf_burst_bytes(rate_bps: int) -> int:
    """tbf bucket: at least 128 KiB (holds two 64 KiB GSO packets) and >= 4 ms of the rate (timer granularity)."""
    return max(128 * 1024, rate_bps // 8 // 250)


def _tbf(ns: str, dev: str, rate: int) -> None:
    """Shape `dev`'s egress in namespace `ns` to `rate` bit/s (tbf: this kernel has no netem)."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    burst, latency = str(tbf_burst_bytes(rate)), f"{TBF_LATENCY_MS}ms"
    _run(
        [
            "tc",
            "-n",
            ns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            f"{rate}bit",
            "burst",
            burst,
            "latency",
            latency,
        ]
    )


@dataclass
class Switch:
    """An L2 segment: a bridge `br0` in its own namespace; hosts attach with one veth each."""

    topo: Topology
    name: str
    ns: str
    subnet: ipaddress.IPv4Network
    ports: int = 0
    _next_ip: Iterator[ipaddress.IPv4Address] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next_ip = self.subnet.hosts()

    def take_ip(self) -> ipaddress.IPv4Address:
        """Next unused address of this segment."""
        try:
            return next(self._next_ip)
        except StopIteration:
            raise EmuError(f"switch {self.name}: subnet {self.subnet} is full") from None


@dataclass
class Link:
    """One host's attachment to a switch: host-side `eth<k>`, switch-side `v<port>`; bit/s (None = unshaped)."""

    host: Host
    switch: Switch
    host_if: str
    switch_if: str
    ip: ipaddress.IPv4Address
    up_bps: int | None
    down_bps: int | None
    loss: float


class Host:
    """A network namespace that runs real processes. `ip` is the address of its first link (None = loopback only)."""

    def __init__(self, topo: Topology, name: str, ns: str) -> None:
        self.topo = topo
        self.name = name
        self.ns = ns
        self.links: list[Link] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, ip={self.ip})"

    @property
    def ip(self) -> str | None:
        """The host's primary address (first link), as a string."""
        return str(self.links[0].ip) if self.links else None

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside this namespace; `ip netns exec` execs it, so the PID is the program's."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess:
        """Run a command to completion inside the namespace (output captured as text unless overridden)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        cp = subprocess.run(self.argv(argv), timeout=timeout, check=False, **kw)
        if check and cp.returncode != 0:
            err = cp.stderr if isinstance(cp.stderr, str) else ""
            raise EmuError(f"[{self.name}] {' '.join(argv)}: exit {cp.returncode}: {err.strip()[-2000:]}")
        return cp

    def popen(self, argv: Sequence[str], *, log: str | None = None, **kw: Any) -> subprocess.Popen:
        """Start a process inside the namespace; the topology stops it (by PID) when it closes.

        `log`: a file that gets the process's stderr (and stdout, unless redirected otherwise)."""
        return self.topo.popen(self, argv, log=log, **kw)

    def counters(self, ifname: str | None = None) -> dict[str, int]:
        """Interface byte/packet counters (`tx_bytes`, `rx_bytes`, ...) of `ifname` (default: first link)."""
        dev = ifname or (self.links[0].host_if if self.links else "lo")
        cp = _run(["ip", "-n", self.ns, "-s", "-j", "link", "show", "dev", dev])
        st = json.loads(cp.stdout)[0]["stats64"]
        return {
            "tx_bytes": st["tx"]["bytes"],
            "rx_bytes": st["rx"]["bytes"],
            "tx_packets": st["tx"]["packets"],
            "rx_packets": st["rx"]["packets"],
            "tx_dropped": st["tx"]["dropped"],
            "rx_dropped": st["rx"]["dropped"],
        }


class Topology:
    """Builder and owner of one emulated network; use as a context manager (everything is deleted on exit).

    with Topology() as topo:
        lan = topo.add_switch("lan")
        seed = topo.add_host("seed", lan, rate=200_000_000)
        p1 = topo.add_host("p1", lan, rate=200_000_000, loss=0.001)
        p1.run(["ping", "-c1", seed.ip])
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or new_prefix()
        if not re.fullmatch(r"[A-Za-z0-9_.]{1,40}", self.prefix):
            raise ValueError(f"bad prefix {self.prefix!r}")
        self.switches: dict[str, Switch] = {}
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._setpriv = shutil.which("setpriv")
        self._closed = False
        self._entered_signals = False

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Topology:
        self._install_signal_handlers()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.close()
        except EmuError as e:
            if ev is None:
                raise
            # an error is already propagating: do not mask it, but do not hide the cleanup failure either
            print(f"netsim.emu: cleanup after {et.__name__ if et else 'error'} failed: {e}", file=sys.stderr)
        finally:
            self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        """Turn SIGTERM/SIGHUP into `Terminated` (main thread only; nested topologies share one handler)."""
        global _sig_depth
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            raise Terminated(signum)

        with _sig_lock:
            if _sig_depth == 0:
                for s in (signal.SIGTERM, signal.SIGHUP):
                    _sig_saved[s] = signal.signal(s, handler)
            _sig_depth += 1
            self._entered_signals = True

    def _restore_signal_handlers(self) -> None:
        global _sig_depth
        if not self._entered_signals:
            return
        with _sig_lock:
            _sig_depth -= 1
            if _sig_depth == 0:
                for s, h in _sig_saved.items():
                    signal.signal(s, h)
                _sig_saved.clear()
            self._entered_signals = False

    def close(self) -> None:
        """Stop our processes (by PID), kill what is left inside our namespaces, delete the namespaces.

        Signals are blocked meanwhile so that a second Ctrl-C cannot leave half a topology behind. Raises EmuError
        if anything of ours is still there afterwards."""
        if self._closed:
            return
        self._closed = True
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        errors: list[str] = []
        try:
            for p in reversed(self._procs):
                self._stop_proc(p, timeout=3.0)
            for ns in reversed(self._namespaces):
                pids = namespace_pids(ns)
                if pids:
                    _kill_and_wait(pids)
            for ns in reversed(self._namespaces):
                cp = _run(["ip", "netns", "del", ns], check=False)
                if cp.returncode != 0 and ns in list_namespaces():
                    errors.append(f"ip netns del {ns}: {cp.stderr.strip()}")
            left = [n for n in list_namespaces() if n.startswith(self.prefix + "-")]
            if left:
                errors.append(f"namespaces left: {left}")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if errors:
            raise EmuError("; ".join(errors))

    @staticmethod
    def _stop_proc(p: subprocess.Popen, timeout: float) -> None:
        if p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """Stop one of our processes gracefully (`sig`, then SIGKILL after `timeout`); returns its exit status."""
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        return p.returncode

    # ----------------------------------------------------------------- building
    def _add_ns(self, suffix: str) -> str:
        if self._closed:
            raise EmuError("topology is closed")
        ns = f"{self.prefix}-{suffix}"
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # no IPv6: keeps router solicitations/DAD out of the byte counters and the sockets on IPv4
        _run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]
        )
        return ns

    def add_switch(self, name: str = "lan", subnet: str | None = None) -> Switch:
        """A new L2 segment. Default subnet: the next /24 of 198.18.0.0/15."""
        if name in self.switches or not re.fullmatch(r"[a-z0-9]{1,12}", name):
            raise ValueError(f"bad or duplicate switch name {name!r}")
        net = ipaddress.IPv4Network(subnet) if subnet else list(DEFAULT_NET.subnets(new_prefix=24))[len(self.switches)]
        ns = self._add_ns(f"sw-{name}")
        _run(["ip", "-n", ns, "link", "add", "name", "br0", "type", "bridge"])
        _run(["ip", "-n", ns, "link", "set", "br0", "up"])
        sw = Switch(self, name, ns, net)
        self.switches[name] = sw
        return sw

    def add_host(
        self,
        name: str,
        switch: Switch | None = None,
        *,
        rate: int | None = None,
        up: int | None = None,
        down: int | None = None,
        loss: float = 0.0,
        ip: str | None = None,
        gateway: Host | None = None,
    ) -> Host:
        """A new host namespace; attached to `switch` when given (else loopback only).

        `rate` shapes both directions (bit/s); `up`/`down` override one direction. `gateway` (a router on the same
        switch) becomes the default route."""
        if name in self.hosts or not re.fullmatch(r"[a-z0-9]{1,16}", name):
            raise ValueError(f"bad or duplicate host name {name!r}")
        host = Host(self, name, self._add_ns(name))
        self.hosts[name] = host
        if switch is not None:
            self.attach(
                host,
                switch,
                up=up if up is not None else rate,
                down=down if down is not None else rate,
                loss=loss,
                ip=ip,
            )
        if gateway is not None:
            gw = self._ip_on(gateway, switch)
            _run(["ip", "-n", host.ns, "route", "add", "default", "via", gw])
        return host

    @staticmethod
    def _ip_on(host: Host, switch: Switch | None) -> str:
        for link in host.links:
            if link.switch is switch:
                return str(link.ip)
        raise EmuError(f"{host.name} has no link on switch {switch.name if switch else None}")

    def attach(
        self,
        host: Host,
        switch: Switch,
        *,
        up: int | None = None,
        down: int | None = None,
        loss: float = 0.0,
        ip: str | None = None,
    ) -> Link:
        """Connect `host` to `switch` with a new veth pair, address it, shape it, add loss."""
        host_if = f"eth{len(host.links)}"
        switch_if = f"v{switch.ports}"
        switch.ports += 1
        addr = ipaddress.IPv4Address(ip) if ip else switch.take_ip()
        if addr not in switch.subnet:
            raise ValueError(f"{addr} is not in {switch.subnet}")
        _run(
            [
                "ip",
                "-n",
                switch.ns,
                "link",
                "add",
                "name",
                switch_if,
                "type",
                "veth",
                "peer",
                "name",
                host_if,
                "netns",
                host.ns,
            ]
        )
        _run(["ip", "-n", switch.ns, "link", "set", switch_if, "master", "br0", "up"])
        _run(["ip", "-n", host.ns, "addr", "add", f"{addr}/{switch.subnet.prefixlen}", "dev", host_if])
        _run(["ip", "-n", host.ns, "link", "set", host_if, "up"])
        link = Link(host, switch, host_if, switch_if, addr, None, None, 0.0)
        host.links.append(link)
        self.shape(link, up=up, down=down)
        if loss:
            self.set_loss(link, loss)
        return link

    def shape(self, link: Link, *, up: int | None, down: int | None) -> None:
        """(Re)shape a link with tbf: `up` on the host side's egress, `down` on the switch side's egress (bit/s)."""
        for ns, dev, rate in ((link.host.ns, link.host_if, up), (link.switch.ns, link.switch_if, down)):
            if rate is None:
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                continue
            _tbf(ns, dev, rate)
        link.up_bps, link.down_bps = up, down

    def join_switches(self, a: Switch, b: Switch, rate: int | None) -> tuple[str, str]:
        """A trunk between two switches (one L2 segment then), shaped to `rate` bit/s each way (None = unshaped).

        Two zones of a cluster with a thinner link between them. Returns the trunk's interface names, (`a`'s end,
        `b`'s end): each end's tx counter is what crossed from its zone to the other."""
        a_if, b_if = f"t{b.name}"[:15], f"t{a.name}"[:15]
        _run(["ip", "-n", a.ns, "link", "add", "name", a_if, "type", "veth", "peer", "name", b_if, "netns", b.ns])
        for sw, dev in ((a, a_if), (b, b_if)):
            _run(["ip", "-n", sw.ns, "link", "set", dev, "master", "br0", "up"])
            if rate is not None:
                _tbf(sw.ns, dev, rate)
        return a_if, b_if

    def set_loss(self, link: Link, p: float) -> None:
        """Drop a random fraction `p` of the packets arriving over `link` (iptables statistic; 0 removes it)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {p}")
        base = ["ip", "netns", "exec", link.host.ns, "iptables", "-w", "5"]
        rule = [
            "INPUT",
            "-i",
            link.host_if,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            f"{p:.6f}",
            "-j",
            "DROP",
        ]
        if link.loss:
            old = rule[:8] + [f"{link.loss:.6f}", "-j", "DROP"]
            _run([*base, "-D", *old])
        if p:
            _run([*base, "-A", *rule])
        link.loss = p

    def add_router(self, name: str, wan: Switch, lan: Switch, *, nat: str = "cone", rate: int | None = None) -> Host:
        """A NAT router between `lan` (its hosts use it as gateway) and `wan`.

        nat="cone": MASQUERADE and unsolicited input dropped (port-restricted cone, research FINDINGS §3);
        "symmetric": MASQUERADE --random-fully (new port per destination); "none": plain routing."""
        if nat not in ("cone", "symmetric", "none"):
            raise ValueError(f"nat must be cone, symmetric or none, not {nat!r}")
        r = self.add_host(name, wan, rate=rate)
        self.attach(r, lan, up=rate, down=rate)
        _run(["ip", "netns", "exec", r.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        ipt = ["ip", "netns", "exec", r.ns, "iptables", "-w", "5"]
        wan_if = r.links[0].host_if
        if nat != "none":
            extra = ["--random-fully"] if nat == "symmetric" else []
            _run([*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", wan_if, "-j", "MASQUERADE", *extra])
            established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"]
            for chain in ("INPUT", "FORWARD"):  # nothing unsolicited from the wan reaches the router or its lan
                _run([*ipt, "-A", chain, "-i", wan_if, *established, "-j", "ACCEPT"])
                _run([*ipt, "-A", chain, "-i", wan_if, "-j", "DROP"])
        return r

    # ----------------------------------------------------------------- processes
    def popen(self, host: Host, argv: Sequence[str], *, log: str | None = None, **kw: Any) -> subprocess.Popen:
        """Start `argv` in `host`'s namespace, in its own session (our Ctrl-C reaches only the driver, which then
        stops children in order), dying with the driver (PR_SET_PDEATHSIG via setpriv)."""
        if self._closed:
            raise EmuError("topology is closed")
        full = host.argv(argv)
        if self._setpriv:
            full = [self._setpriv, "--pdeathsig", "KILL", "--", *full]
        kw.setdefault("start_new_session", True)
        if log is not None:
            with open(log, "ab") as f:
                kw.setdefault("stdout", f)
                kw.setdefault("stderr", f)
                p = subprocess.Popen(full, **kw)
        else:
            p = subprocess.Popen(full, **kw)
        self._procs.append(p)
        return p

    def namespaces(self) -> list[str]:
        """The namespaces this topology created (and will delete)."""
        return list(self._namespaces)


def stale_namespaces() -> list[tuple[str, int]]:
    """netsim namespaces whose creating process is gone (left by a SIGKILLed run): (name, creator pid)."""
    out = []
    for ns in list_namespaces():
        m = PREFIX_RE.match(ns)
        if m and not _pid_alive(int(m.group(1), 16)):
            out.append((ns, int(m.group(1), 16)))
    return out


def reap_stale(log: IO[str] | None = None) -> list[str]:
    """Delete stale netsim namespaces (and SIGKILL the processes still inside them). Returns their names."""
    done = []
    for ns, pid in stale_namespaces():
        pids = namespace_pids(ns)
        if pids:
            _kill_and_wait(pids)
        _run(["ip", "netns", "del", ns])
        if log:
            print(f"deleted {ns} (creator pid {pid} gone; killed {len(pids)} processes inside)", file=log)
        done.append(ns)
    return done
