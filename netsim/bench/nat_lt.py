"""libtorrent on the NAT matrix: what a user has today, in the same run and the same namespaces as p2pd.

For every cell (seed kind X, leech kind Y) the seed is a libtorrent session on the `a` host behind its router of
kind X, the leech one on the `b` host behind its own router of kind Y, exactly the hosts p2pd's cell uses. Peers
find each other through a minimal HTTP tracker (`netsim.bench.bt`, as the swarm bench) on the public tracker host.
UPnP and NAT-PMP have no router to talk to in the netns, so what libtorrent can use is uTP and TCP (both on) and its
BEP 55 holepunch: a peer connected to both sides relays the rendezvous. That needs a third, public peer, so one
public helper session joins every torrent in upload_mode (it never holds a piece, so the bytes can only come from
the seed) and tells each side about the other by PEX. The helper and seeds are connected before the leeches start.

Per cell (driver: `netsim.bench.clients.lt_nat_node`): connected (a handshaken connection to a non-helper peer),
time to first piece and to complete from the moment the leech's torrent was added, payload bytes, the transport
the bytes came over (uTP/TCP, from peer_info flags) and whether that connection was holepunched; each cell is cut
off at its timeout, so a cell that never connects costs only that. Then the same cone<->cone vs public<->public
throughput pair as p2pd's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from netsim.bench.bt import make_torrent
from netsim.bench.clients.bittorrent import piece_size
from netsim.bench.harness import NEUTRAL_CWD, BenchError, child_env, stop_all
from netsim.emu import Host, Topology

LT_PORT = 6881
LT_TRACKER_PORT = 6969
CLIENTS = ("p2pd", "libtorrent")
RESULT_KEYS = {"name": str, "connected": bool, "complete": bool, "bytes": int}
THROUGHPUT_PAIRS = (("cone", "port-restricted-cone"), ("public", "public"))


def parse_clients(text: str) -> tuple[str, ...]:
    """`--clients p2pd,libtorrent`: a comma list of known clients, each once, in the order given."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in CLIENTS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(
            f"--clients {text!r}: give a comma list of distinct names out of {', '.join(CLIENTS)} "
            f"(e.g. p2pd,libtorrent)"
        )
    return names


def libtorrent_missing() -> str | None:
    """Why the libtorrent comparison cannot run here, or None."""
    if importlib.util.find_spec("libtorrent") is None:
        return "python module libtorrent not importable (pip install libtorrent, or the [bench] extra)"
    return None


def parse_result(line: str) -> dict[str, Any]:
    """A driver's `RESULT {json}` line as a dict; anything else is a BenchError that quotes the line."""
    word, _, rest = line.partition(" ")
    if word != "RESULT":
        raise BenchError(f"libtorrent driver: expected a RESULT line, got {line[:200]!r}")
    try:
        r = json.loads(rest)
    except json.JSONDecodeError as e:
        raise BenchError(f"libtorrent driver: RESULT is not JSON ({e}): {rest[:200]!r}") from None
    if not isinstance(r, dict):
        raise BenchError(f"libtorrent driver: RESULT is not an object: {rest[:200]!r}")
    for k, typ in RESULT_KEYS.items():
        if not isinstance(r.get(k), typ):
            raise BenchError(f"libtorrent driver: RESULT field {k!r} missing or not {typ.__name__}: {rest[:200]!r}")
    for k in ("first_piece_s", "total_s"):
        v = r.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or math.isinf(v)):
            raise BenchError(f"libtorrent driver: RESULT field {k!r} is not a time in seconds: {rest[:200]!r}")
    return r


class _Session:
    """One lt_nat_node process; a reader thread collects its stdout lines."""

    def __init__(self, name: str, host: Host, spec: dict[str, Any], work: Path) -> None:
        self.name = name
        spec_path = work / f"lt-{name}.json"
        spec_path.write_text(json.dumps(spec))
        self.proc = host.popen(
            [sys.executable, "-m", "netsim.bench.clients.lt_nat_node", "--spec", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            log=str(work / f"lt-{name}.log"),
            text=True,
            bufsize=1,
            env=child_env(),
            cwd=NEUTRAL_CWD,
        )
        self.lines: list[str] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.strip())
                self._cv.notify_all()
        with self._cv:
            self.lines.append("<EOF>")
            self._cv.notify_all()

    def wait_for(self, words: set[str], timeout: float) -> bool:
        """Until lines `<word>` (or `SEEN <word>`) arrived for every word, or timeout/EOF; True if all came."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                seen = set(self.lines) | {ln.partition(" ")[2] for ln in self.lines if ln.startswith("SEEN ")}
                if words <= seen:
                    return True
                left = end - time.monotonic()
                if "<EOF>" in self.lines or left <= 0:
                    return False
                self._cv.wait(left)

    def results(self) -> list[dict[str, Any]]:
        with self._cv:
            return [parse_result(ln) for ln in self.lines if ln.startswith("RESULT ")]

    def quit(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("QUIT\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # already gone: stop_all reaps it


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _payload(work: Path, tag: str, size: int, url: str) -> tuple[Path, Path]:
    src = work / f"lt-src-{tag}"
    src.mkdir()
    f = src / f"{tag}.bin"
    with open(f, "wb") as fh:
        left = size
        while left:
            n = min(left, 8 << 20)
            fh.write(os.urandom(n))
            left -= n
    torrent = work / f"{tag}.torrent"
    make_torrent(str(f), str(torrent), url, piece_size(size))
    return f, torrent


class LtRound:
    """A set of cells run at once: one helper session, one seed session per seed host, one leech per leech host."""

    def __init__(self, topo: Topology, helper: Host, tracker_url: str, work: Path, log: IO[str]) -> None:
        self.topo, self.helper, self.url, self.work, self.log = topo, helper, tracker_url, work, log

    def run(
        self, cells: list[tuple[str, str, Host, Host, int, str]], timeout_s: float, label: str
    ) -> list[dict[str, Any]]:
        """`cells`: (seed kind, leech kind, seed host, leech host, bytes, tag). One dict per cell."""
        d = self.work / label
        d.mkdir()
        src: dict[str, tuple[Path, Path]] = {tag: _payload(d, tag, n, self.url) for *_, n, tag in cells}
        assert self.helper.ip is not None
        sessions: list[_Session] = []

        def spec(host: Host, torrents: list[dict[str, str]]) -> dict[str, Any]:
            return {
                "listen": f"{host.ip}:{LT_PORT}",
                "timeout_s": timeout_s,
                "helper_ip": self.helper.ip,
                "torrents": torrents,
            }

        def start(name: str, host: Host, torrents: list[dict[str, str]]) -> _Session:
            s = _Session(f"{label}-{name}", host, spec(host, torrents), d)
            sessions.append(s)
            return s

        def ready(s: _Session) -> None:
            if not s.wait_for({"READY"}, 30):
                raise BenchError(f"libtorrent {s.name}: not ready in 30 s (log {d}/lt-{s.name}.log)")

        try:
            (d / "helper").mkdir()
            helper = start(
                "helper",
                self.helper,
                [
                    {"name": tag, "torrent": str(t), "save": str(d / "helper"), "role": "helper"}
                    for tag, (_, t) in src.items()
                ],
            )
            ready(helper)
            seeds: dict[str, list[dict[str, str]]] = {}
            leeches: dict[str, list[dict[str, str]]] = {}
            hosts: dict[str, Host] = {}
            for _, _, sh, lh, _, tag in cells:
                f, t = src[tag]
                hosts[sh.name], hosts[lh.name] = sh, lh
                seeds.setdefault(sh.name, []).append(
                    {"name": tag, "torrent": str(t), "save": str(f.parent), "role": "seed"}
                )
                out = d / f"out-{tag}"
                out.mkdir()
                leeches.setdefault(lh.name, []).append(
                    {"name": tag, "torrent": str(t), "save": str(out), "role": "leech"}
                )
            for s in [start(f"seed-{h}", hosts[h], ts) for h, ts in seeds.items()]:
                ready(s)
            # BEP 55 needs the helper to know the seed (it PEXes it to the leech): wait until each seed joined it
            joined = helper.wait_for(set(src), 20)
            if not joined:
                print(f"[nat] libtorrent {label}: not every seed reached the helper in 20 s", file=self.log, flush=True)
            lsess = [start(f"leech-{h}", hosts[h], ts) for h, ts in leeches.items()]
            for s in lsess:
                if not s.wait_for({"END"}, timeout_s + 30):
                    raise BenchError(
                        f"libtorrent {s.name}: no END within {timeout_s + 30:.0f} s (log {d}/lt-{s.name}.log)"
                    )
            got = {r["name"]: r for s in lsess for r in s.results()}
        finally:
            for s in sessions:
                s.quit()
            stop_all(self.topo, [s.proc for s in sessions])
        res = []
        for sk, lk, _, _, n, tag in cells:
            r = got.get(tag)
            if r is None:
                raise BenchError(f"libtorrent {label}: no RESULT for cell {tag}")
            f, _ = src[tag]
            outf = d / f"out-{tag}" / f.name
            identical = (_sha256(outf) == _sha256(f)) if r["complete"] and outf.exists() else None
            res.append(
                {
                    "seed": sk,
                    "leech": lk,
                    "connected": r["connected"],
                    "ok": bool(identical),
                    "identical": identical,
                    "first_piece_s": r["first_piece_s"],
                    "total_s": r["total_s"],
                    "bytes": r["bytes"],
                    "size_bytes": n,
                    "transport": r.get("transport"),
                    "holepunched": r.get("holepunched"),
                    "sources": r.get("sources"),  # per source peer: transport, holepunched, outgoing, bytes
                    "helper_reached_by_all_seeds": joined,
                    "error": None
                    if identical
                    else ("bytes differ" if identical is False else f"not complete after {timeout_s:.0f} s"),
                }
            )
        return res


def run_lt_matrix(
    topo: Topology,
    tracker_host: Host,
    helper: Host,
    hosts: dict[tuple[str, str], Host],
    kinds: tuple[str, ...],
    short: dict[str, str],
    work: Path,
    size: int,
    throughput_size: int,
    timeout_s: float,
    log: IO[str],
) -> dict[str, Any]:
    """Every ordered pair of `kinds` at once on the `a` (seed) and `b` (leech) hosts; then the throughput pair."""
    why = libtorrent_missing()
    if why:
        raise BenchError(why)
    work = work / "libtorrent"
    work.mkdir()
    url = f"http://{tracker_host.ip}:{LT_TRACKER_PORT}/announce"
    tracker = tracker_host.popen(
        [sys.executable, "-m", "netsim.bench.bt", "tracker", "--listen", f"{tracker_host.ip}:{LT_TRACKER_PORT}"],
        stdout=subprocess.PIPE,
        log=str(work / "bt-tracker.log"),
        text=True,
        env=child_env(),
        cwd=NEUTRAL_CWD,
    )
    try:
        assert tracker.stdout is not None
        if tracker.stdout.readline().strip() != "READY":
            raise BenchError(f"BitTorrent tracker did not start (exit {tracker.poll()}): {work}/bt-tracker.log")
        rnd = LtRound(topo, helper, url, work, log)
        t0 = time.monotonic()
        cells = rnd.run(
            [
                (sk, lk, hosts[(sk, "a")], hosts[(lk, "b")], size, f"lt{short[sk]}{short[lk]}")
                for sk in kinds
                for lk in kinds
            ],
            timeout_s,
            "matrix",
        )
        print(f"[nat] libtorrent matrix: all cells done in {time.monotonic() - t0:.1f} s", file=log, flush=True)
        throughput: dict[str, Any] = {}
        for label, kind in THROUGHPUT_PAIRS:
            if kind not in kinds or not throughput_size:
                continue
            tp_timeout = max(2 * timeout_s, throughput_size / 5e6)  # a connected pair moves faster than 5 MB/s
            (c,) = rnd.run(
                [(kind, kind, hosts[(kind, "a")], hosts[(kind, "b")], throughput_size, f"lttp{short[kind]}")],
                tp_timeout,
                f"tp-{label}",
            )
            mbps = throughput_size / c["total_s"] / 1e6 if c["ok"] and c["total_s"] else None
            throughput[label] = {**c, "MBps": None if mbps is None else round(mbps, 1)}
            print(f"[nat] libtorrent throughput {label}: {c['transport']}, {c['total_s']} s", file=log, flush=True)
    finally:
        stop_all(topo, [tracker])
    order = {k: i for i, k in enumerate(kinds)}
    cells.sort(key=lambda c: (order[c["seed"]], order[c["leech"]]))
    return {
        "kinds": list(kinds),
        "size_bytes": size,
        "timeout_s": timeout_s,
        "setup": (
            "libtorrent "
            + _lt_version()
            + ": uTP+TCP in and out, PEX, BEP 55 holepunch (default), no UPnP/NAT-PMP/DHT/LSD; peers via an HTTP "
            "tracker on the public tracker host; 1 public helper peer (upload_mode, holds no piece) joins every "
            "torrent as the BEP 55 rendezvous relay"
        ),
        "cells": cells,
        "throughput": throughput,
    }


def _lt_version() -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import libtorrent as lt

    return str(lt.__version__)


def p95(xs: list[float]) -> float | None:
    """The 95th percentile by rank (nearest rank, no interpolation: a cell count of 25 has no in-between)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]


def lt_summary(m: dict[str, Any]) -> dict[str, Any]:
    """Cells connected and complete, first piece p95, and by what transport the bytes came."""
    cells = m["cells"]
    tp = m["throughput"]
    ratio = None
    if tp.get("cone", {}).get("MBps") and tp.get("public", {}).get("MBps"):
        ratio = round(tp["cone"]["MBps"] / tp["public"]["MBps"], 3)
    return {
        "cells": len(cells),
        "connected": sum(1 for c in cells if c["connected"]),
        "complete": sum(1 for c in cells if c["ok"]),
        "over_utp": sum(1 for c in cells if c["ok"] and "uTP" in (c["transport"] or "")),
        "over_tcp": sum(1 for c in cells if c["ok"] and "TCP" in (c["transport"] or "")),
        "holepunched": sum(1 for c in cells if c["ok"] and c["holepunched"]),
        "first_piece_p95_s": p95([c["first_piece_s"] for c in cells if c["first_piece_s"] is not None]),
        "cone_MBps": tp.get("cone", {}).get("MBps"),
        "public_MBps": tp.get("public", {}).get("MBps"),
        "cone_over_public_throughput": ratio,
    }


def grid_table(m: dict[str, Any], cell: Callable[[dict[str, Any]], str]) -> str:
    """Rows: seed kind, columns: leech kind, each cell written by `cell`; columns padded to one width."""
    kinds = m["kinds"]
    by = {(c["seed"], c["leech"]): c for c in m["cells"]}
    rows = [["seed \\ leech", *kinds]] + [[sk, *(cell(by[(sk, lk)]) for lk in kinds)] for sk in kinds]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def first_piece(c: dict[str, Any]) -> str:
    return "-" if c["first_piece_s"] is None else f"{c['first_piece_s']:.2f}s"


def lt_matrix_table(m: dict[str, Any]) -> str:
    """Cell: transport (+holepunch) and time to first piece."""

    def cell(c: dict[str, Any]) -> str:
        if not c["connected"] and not c["ok"]:
            return "no-connection"
        how = (c["transport"] or "connected") + ("+holepunch" if c["holepunched"] else "")
        return f"{how} {first_piece(c)}" + ("" if c["ok"] else " !")

    return grid_table(m, cell)
