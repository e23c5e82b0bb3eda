"""One libtorrent session = one swarm node, driven over stdin/stdout by the libtorrent runner.

    python -m netsim.bench.clients.lt_node --role seed|leech --torrent T --save DIR --listen IP:PORT [--utp]

Prints `READY` when set up (a seed: seeding and its tracker announce answered), reads `GO` (a leecher resumes its
paused torrent and announces), prints `DONE <json>` on torrent_finished (every piece passed its SHA-1 check), keeps
seeding until `QUIT` or EOF, then prints `BYE <json>`.

Settings are those that made libtorrent do its best here (research FINDINGS §4): TCP only (uTP was 2x slower on
these links), no DHT/LSD/UPnP, `allow_multiple_connections_per_ip` (loopback nodes share 127/8), every peer in the
unlimited local peer class, torrents added without the auto_managed|paused defaults.
"""

from __future__ import annotations

import argparse
import json
import select
import sys
import time
import warnings

warnings.simplefilter("ignore", DeprecationWarning)
import libtorrent as lt  # noqa: E402 - its import emits DeprecationWarnings we silence first


def out(*x: object) -> None:
    """One protocol line to the runner."""
    print(*x, flush=True)


def readline(timeout: float) -> str | None:
    """A line from the runner, '' on EOF, None if nothing arrived within `timeout`."""
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    return sys.stdin.readline() if r else None


def main() -> int:
    """Run one node until told to quit."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["seed", "leech"], required=True)
    ap.add_argument("--torrent", required=True)
    ap.add_argument("--save", required=True)
    ap.add_argument("--listen", required=True, help="ip:port")
    ap.add_argument("--utp", action="store_true", help="allow uTP (default: TCP only)")
    ap.add_argument(
        "--utp-only",
        action="store_true",
        help="uTP only, no TCP: every byte under LEDBAT's congestion control (the autothrottle bench's comparison)",
    )
    a = ap.parse_args()

    ip, _ = a.listen.rsplit(":", 1)
    ses = lt.session(
        {
            "listen_interfaces": a.listen,
            "outgoing_interfaces": ip,  # source address = our own address (matters on loopback)
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "allow_multiple_connections_per_ip": True,
            "rate_limit_ip_overhead": False,
            "upload_rate_limit": 0,
            "download_rate_limit": 0,
            "enable_outgoing_utp": a.utp or a.utp_only,
            "enable_incoming_utp": a.utp or a.utp_only,
            "enable_outgoing_tcp": not a.utp_only,
            "enable_incoming_tcp": not a.utp_only,
            # mixed_mode_algorithm throttles uTP peers beside *libtorrent's own* TCP peers (prefer_tcp, the default)
            # or shares by peer count (peer_proportional); with uTP only there are none, so it is moot; set
            # explicitly so a run does not depend on the default
            "mixed_mode_algorithm": int(lt.bandwidth_mixed_algo_t.peer_proportional),
            "alert_mask": (
                lt.alert.category_t.status_notification
                | lt.alert.category_t.error_notification
                | lt.alert.category_t.tracker_notification
            ),
        }
    )
    flt = lt.ip_filter()  # every peer -> the local peer class, which has no rate limit
    flt.add_rule("0.0.0.0", "255.255.255.255", 1 << ses.local_peer_class_id)
    ses.set_peer_class_filter(flt)

    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(a.torrent)
    atp.save_path = a.save
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    if a.role == "seed":
        atp.flags |= lt.torrent_flags.seed_mode  # trust the data: the seed is not what we time
    else:
        atp.flags |= lt.torrent_flags.paused
    h = ses.add_torrent(atp)

    def stats() -> str:
        st = h.status()
        return json.dumps(
            {
                "payload_up": st.total_payload_upload,
                "payload_down": st.total_payload_download,
                "up": st.total_upload,
                "down": st.total_download,
                "peers": st.num_peers,
            }
        )

    def drain() -> list:
        alerts = ses.pop_alerts()
        for al in alerts:
            if isinstance(
                al, (lt.tracker_error_alert, lt.peer_error_alert, lt.listen_failed_alert, lt.torrent_error_alert)
            ):
                print(f"[{a.listen}] {type(al).__name__}: {al.message()}", file=sys.stderr, flush=True)
        return alerts

    end = time.time() + 20
    announced = a.role == "leech"
    while time.time() < end:
        announced = announced or any(isinstance(al, lt.tracker_reply_alert) for al in drain())
        if announced and (a.role == "leech" or h.status().is_seeding):
            break
        time.sleep(0.02)
    else:
        print(f"[{a.listen}] not ready after 20 s (announced={announced})", file=sys.stderr, flush=True)
        return 1
    out("READY")

    if a.role == "leech":
        while True:
            line = readline(1.0)
            if line == "" or (line and line.strip() == "QUIT"):
                return 0
            if line and line.strip() == "GO":
                break
        h.resume()
        done = False
        while not done:
            done = any(isinstance(al, lt.torrent_finished_alert) for al in drain()) or h.status().is_seeding
            if not done:
                time.sleep(0.005)
        out("DONE", stats())

    while True:  # keep serving until the runner says QUIT (or goes away)
        drain()
        line = readline(0.5)
        if line == "" or (line and line.strip() == "QUIT"):
            break
    out("BYE", stats())
    return 0


if __name__ == "__main__":
    sys.exit(main())
