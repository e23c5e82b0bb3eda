"""One libtorrent session behind (or in front of) a NAT router, for the NAT matrix (`netsim.bench.nat_lt`).

    python -m netsim.bench.clients.lt_nat_node --spec SPEC.json

SPEC: {"listen": "IP:PORT", "timeout_s": 30, "helper_ip": "IP", "torrents": [{"name", "torrent", "save", "role"}]},
role one of seed / leech / helper. Unlike lt_node (the swarm bench, TCP only), this is libtorrent as a user runs it
behind a NAT: uTP and TCP both on, BEP 55 holepunch (built into libtorrent 2.x, used when an outgoing uTP connect
fails to a peer a holepunch-capable peer told us about by PEX), PEX on; UPnP/NAT-PMP off (no such router in the
netns). `close_redundant_connections` is off so the public helper (a torrent in upload_mode: it never has a piece,
so it cannot be the source of the bytes) stays connected to the seed and leech: it is the rendezvous relay that
BEP 55 needs.

Lines out: `READY` (seed/helper: every torrent announced; leech: torrents added, the clock of each cell starts),
`SEEN <name>` (helper: first peer of that torrent connected), `RESULT <json>` (leech: per torrent, when complete or
at its timeout), `END` (leech: every torrent reported); then it keeps serving until `QUIT` or EOF and prints `BYE`.
"""

from __future__ import annotations

import argparse
import json
import select
import sys
import time
import warnings
from typing import Any

warnings.simplefilter("ignore", DeprecationWarning)
import libtorrent as lt  # noqa: E402 - its import emits DeprecationWarnings we silence first

# peer_info flag bits (libtorrent peer_info.hpp); the 2.x bindings export holepunched but not utp_socket
HOLEPUNCHED = int(lt.peer_info.holepunched)
UTP_SOCKET = int(getattr(lt.peer_info, "utp_socket", 1 << 17))
CONNECTING = int(lt.peer_info.connecting)
HANDSHAKE = int(lt.peer_info.handshake)
OUTGOING = int(lt.peer_info.outgoing_connection)
POLL_S = 0.02


def out(*x: object) -> None:
    """One protocol line to the runner."""
    print(*x, flush=True)


def readline(timeout: float) -> str | None:
    """A line from the runner, '' on EOF, None if nothing arrived within `timeout`."""
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    return sys.stdin.readline() if r else None


def session(listen: str) -> Any:
    """A session with libtorrent's NAT features on (uTP in and out, holepunch and PEX are defaults)."""
    ip, _ = listen.rsplit(":", 1)
    ses = lt.session(
        {
            "listen_interfaces": listen,
            "outgoing_interfaces": ip,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": True,
            "enable_incoming_utp": True,
            "enable_outgoing_tcp": True,
            "enable_incoming_tcp": True,
            "close_redundant_connections": False,
            "allow_multiple_connections_per_ip": True,
            "upload_rate_limit": 0,
            "download_rate_limit": 0,
            "alert_mask": lt.alert.category_t.error_notification | lt.alert.category_t.tracker_notification,
        }
    )
    flt = lt.ip_filter()  # every peer -> the local peer class, which has no rate limit
    flt.add_rule("0.0.0.0", "255.255.255.255", 1 << ses.local_peer_class_id)
    ses.set_peer_class_filter(flt)
    return ses


class Leech:
    """One leeching torrent: its clock, first piece, completion and the connections its bytes came over."""

    def __init__(self, name: str, h: Any, helper_ip: str, timeout: float) -> None:
        self.name, self.h, self.helper_ip = name, h, helper_ip
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.first_piece_s: float | None = None
        self.total_s: float | None = None
        self.seed_connected = False
        self.sources: dict[str, dict[str, Any]] = {}
        self.reported = False
        self.next_peers = 0.0

    def poll(self, now: float) -> None:
        st = self.h.status()
        if self.first_piece_s is None and st.num_pieces >= 1:
            self.first_piece_s = now - self.t0
        if self.total_s is None and (st.is_finished or st.is_seeding):
            self.total_s = now - self.t0
            self.first_piece_s = self.first_piece_s if self.first_piece_s is not None else self.total_s
        if now >= self.next_peers or self.total_s is not None:
            self.next_peers = now + 0.1
            for p in self.h.get_peer_info():
                ip, port = p.ip
                if ip == self.helper_ip:
                    continue
                if not p.flags & (CONNECTING | HANDSHAKE):
                    self.seed_connected = True
                if p.total_download > 0:
                    self.sources[f"{ip}:{port}"] = {
                        "transport": "uTP" if p.flags & UTP_SOCKET else "TCP",
                        "holepunched": bool(p.flags & HOLEPUNCHED),
                        "outgoing": bool(p.flags & OUTGOING),
                        "bytes": p.total_download,
                    }

    def result(self) -> dict[str, Any]:
        st = self.h.status()
        return {
            "name": self.name,
            "connected": self.seed_connected or bool(self.sources),
            "complete": self.total_s is not None,
            "first_piece_s": None if self.first_piece_s is None else round(self.first_piece_s, 3),
            "total_s": None if self.total_s is None else round(self.total_s, 3),
            "bytes": st.total_payload_download,
            "transport": ",".join(sorted({s["transport"] for s in self.sources.values()})) or None,
            "holepunched": any(s["holepunched"] for s in self.sources.values()),
            "sources": self.sources,
        }


def main() -> int:
    """Run one session until told to quit."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON file: listen, timeout_s, helper_ip, torrents")
    a = ap.parse_args()
    with open(a.spec) as f:
        spec = json.load(f)
    ses = session(spec["listen"])
    handles: dict[str, tuple[str, Any]] = {}
    for t in spec["torrents"]:
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(t["torrent"])
        atp.save_path = t["save"]
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        if t["role"] == "seed":
            atp.flags |= lt.torrent_flags.seed_mode  # trust the data: the seed is not what we time
        elif t["role"] == "helper":
            atp.flags |= lt.torrent_flags.upload_mode  # never downloads, so never a source of the bytes
        handles[t["name"]] = (t["role"], ses.add_torrent(atp))

    def drain() -> list[Any]:
        alerts = ses.pop_alerts()
        for al in alerts:
            if isinstance(al, (lt.tracker_error_alert, lt.listen_failed_alert, lt.torrent_error_alert)):
                print(f"[{spec['listen']}] {type(al).__name__}: {al.message()}", file=sys.stderr, flush=True)
        return list(alerts)

    leeches = [Leech(n, h, spec.get("helper_ip", ""), float(spec["timeout_s"])) for n, (r, h) in handles.items()]
    leeches = [lc for lc in leeches if handles[lc.name][0] == "leech"]
    waiting = {n for n, (r, _) in handles.items() if r != "leech"}
    end = time.monotonic() + 20
    while waiting and time.monotonic() < end:
        for al in drain():
            if isinstance(al, lt.tracker_reply_alert):
                waiting -= {n for n in waiting if handles[n][1] == al.handle}
        time.sleep(POLL_S)
    if waiting:
        print(f"[{spec['listen']}] not announced after 20 s: {sorted(waiting)}", file=sys.stderr, flush=True)
        return 1
    out("READY")

    unseen = {n for n, (r, _) in handles.items() if r == "helper"}
    while leeches and not all(lc.reported for lc in leeches):
        drain()
        now = time.monotonic()
        for lc in leeches:
            if lc.reported:
                continue
            lc.poll(now)
            if lc.total_s is not None or now >= lc.deadline:
                out("RESULT", json.dumps(lc.result()))
                lc.reported = True
        time.sleep(POLL_S)
    if leeches:
        out("END")

    while True:  # keep serving until the runner says QUIT (or goes away)
        drain()
        for n in sorted(unseen):
            if handles[n][1].status().num_peers >= 1:
                out("SEEN", n)
                unseen.discard(n)
        line = readline(0.1)
        if line == "" or (line and line.strip() == "QUIT"):
            break
    out("BYE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
