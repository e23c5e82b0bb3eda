"""`p2pd` command line: run the daemon, and talk to a running one over its control socket.

How a command finds its daemon: `--socket PATH`, else $P2PD_SOCKET, else `--data-dir DIR` or
$P2PD_DATA_DIR + `/p2pd.sock`, else the default data dir (/var/lib/p2pd as root, else
~/.local/share/p2pd). Errors are one line on stderr and a non-zero exit, never a traceback; the exit
status says what kind of failure it was (`ErrorCode.exit_status`, the table in docs/interfaces.md).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import trio
import typer

from p2pd.config import PATHS, AutoThrottleConfig, DaemonConfig, SwarmConfig, TraversalConfig
from p2pd.config_sources import P2PD_RUN, configured
from p2pd.errors import EXIT_INTERRUPTED, ErrorCode, P2pdError
from p2pd.paths import default_data_dir, socket_path
from p2pd.rpc import RpcError, connect_unix, parse_hostport
from p2pd.trio_util import leaf_exceptions
from p2pd.units import format_rate, format_size, parse_rate, parse_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="p2pd: peer-to-peer distribution of models and packed environments.",
)


def fail(msg: str, code: ErrorCode) -> NoReturn:
    exit_with(msg, code.exit_status)


def exit_with(msg: str, status: int) -> NoReturn:
    typer.echo(f"p2pd: error: {msg}", err=True)
    raise typer.Exit(status)


DataDirOpt = typer.Option(None, "--data-dir", help="data dir of the daemon to talk to")
SocketOpt = typer.Option(None, "--socket", help="control socket of the daemon (overrides --data-dir)")


async def call(sock: Path, method: str, params: dict[str, Any], *, timeout: float = 30.0, on_event: Any = None) -> Any:
    try:
        async with connect_unix(str(sock)) as client:
            return await client.call(method, params, timeout=timeout, on_event=on_event)
    except (OSError, trio.TooSlowError) as e:
        raise RpcError(
            ErrorCode.UNREACHABLE,
            f"cannot reach the p2pd daemon at {sock} ({e.__class__.__name__}): "
            "is `p2pd run` (or the p2pd service) running with this data dir?",
        ) from None


def run_client(fn: Any, *args: Any) -> Any:
    try:
        return trio.run(fn, *args)
    except RpcError as e:
        fail(e.message, e.code)
    except BaseExceptionGroup as eg:
        for leaf in leaf_exceptions(eg):
            if isinstance(leaf, RpcError):
                fail(leaf.message, leaf.code)
        raise
    except KeyboardInterrupt:
        exit_with("interrupted (the daemon keeps downloading)", EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------------------- run
@app.command(cls=configured(P2PD_RUN))  # every option is also a key of /etc/p2pd/p2pd.toml and a $P2PD_<KEY>
def run(
    tracker: str = typer.Option(..., "--tracker", help="tracker HOST:PORT; several separated by commas (failover)"),
    listen: str = typer.Option("{}:{}".format(*DaemonConfig.listen), "--listen", help="HOST:PORT to serve peers on"),
    data_dir: Path = typer.Option(None, "--data-dir", help="where artifacts, journals and the control socket live"),
    egress_limit: str = typer.Option(None, "--egress-limit", help="upload cap, e.g. 50MB/s or 400Mbit/s"),
    ingress_limit: str = typer.Option(None, "--ingress-limit", help="download cap, e.g. 50MB/s or 400Mbit/s"),
    advertise: str = typer.Option(None, "--advertise", help="address peers should dial (default: listen host)"),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE node label, e.g. zone=eu-1a (repeatable)"),
    zone: str = typer.Option(None, "--zone", help="this node's zone (the label zone=NAME): peer choice, zone budgets"),
    stall_timeout: float = typer.Option(
        SwarmConfig.stall_timeout, "--stall-timeout", help="drop a peer silent this long (s) with requests pending"
    ),
    pipeline: int = typer.Option(SwarmConfig.pipeline_depth, "--pipeline", help="piece requests in flight per peer"),
    max_peers: int = typer.Option(SwarmConfig.max_peers, "--max-peers", help="connections per artifact"),
    upload_slots: int = typer.Option(
        SwarmConfig.upload_slots,
        "--upload-slots",
        help=f"peers served at once with {SwarmConfig.upload_slots_min_peers}+ connections, others deferred (0: all)",
    ),
    compress: bool = typer.Option(
        SwarmConfig.compress, "--compress/--no-compress", help="zstd for pieces that compress"
    ),
    chain: bool = typer.Option(
        SwarmConfig.chain,
        "--chain/--no-chain",
        help="fetch along one chain of the artifact's nodes (a fleet released at once on equal links)",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error"),
    tracker_wait: float = typer.Option(
        DaemonConfig.tracker_wait, "--tracker-wait", help="seconds to wait for a tracker at start"
    ),
    paths: str = typer.Option(
        ",".join(PATHS), "--paths", help="ways to reach peers, raced in this order (behind NAT: nothing to set)"
    ),
    relay: bool = typer.Option(
        False, "--relay", help="relay bytes for nodes that cannot reach each other (run it on a node others can dial)"
    ),
    relay_listen: str = typer.Option(
        "{}:{}".format(*TraversalConfig.relay_listen),
        "--relay-listen",
        help="HOST:PORT the relay listens on (with --relay)",
    ),
    relay_rate: str = typer.Option(None, "--relay-rate", help="cap on all relayed bytes, e.g. 50MB/s (with --relay)"),
    relay_max_pairs: int = typer.Option(
        TraversalConfig.relay_max_pairs, "--relay-max-pairs", help="node pairs relayed at once (with --relay)"
    ),
    auto_throttle: str = typer.Option(
        "on",
        "--auto-throttle",
        help="on (the default, docs/throttling.md): yield the link to other traffic on this interface; off: never",
    ),
    link_capacity: str = typer.Option(
        None, "--link-capacity", help="the link's rate per direction, e.g. 10Gbit/s (default: learned from traffic)"
    ),
    reserve: str = typer.Option(
        f"{AutoThrottleConfig.reserve_fraction:.0%}",
        "--reserve",
        help="room left to other traffic while it grows: a share of capacity (20%) or a RATE",
    ),
    auto_throttle_interface: str = typer.Option(
        None, "--auto-throttle-interface", help="interface to watch (default: the one the route to the tracker takes)"
    ),
    metrics_listen: str = typer.Option(
        None, "--metrics-listen", help="HOST:PORT to serve Prometheus metrics on, at /metrics (default: off)"
    ),
    cache_max: str = typer.Option(
        None,
        "--cache-max",
        help="cap on the cache: a SIZE (500GiB) or a share of the disk (80%); least recently used artifacts "
        "that are not pinned or in use are evicted to make room (default: no cap)",
    ),
    join_secret_file: Path = typer.Option(
        None,
        "--join-secret-file",
        help="the cluster's join secret (or $P2PD_JOIN_SECRET_FILE / $P2PD_JOIN_SECRET); see docs/security.md",
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="join an open cluster without a join secret (a lab only: docs/security.md)"
    ),
    encrypt: bool = typer.Option(
        False,
        "--encrypt",
        help="wrap every peer connection in TLS 1.3 (secret artifacts); every node of the cluster must set it",
    ),
    trust_publisher: list[str] = typer.Option(
        [], "--trust-publisher", help="node id whose env artifacts this node unpacks (repeatable; default: tracker's)"
    ),
    unpack_user: str = typer.Option(
        None,
        "--unpack-user",
        help="unprivileged user that runs an env's code (conda-unpack, its python) when the daemon is root "
        "(default: the p2pd user; none: envs are refused)",
    ),
    nat_check_every: float = typer.Option(
        DaemonConfig.nat_check_every,
        "--nat-check-every",
        help="seconds between STUN checks of the public address (keeps the NAT mapping alive; under ~30)",
    ),
) -> None:
    """Run the node daemon (what the systemd unit starts)."""
    from p2pd.daemon import Daemon
    from p2pd.identity import NO_SECRET_HINT, read_join_secret

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("p2pd.cli").info("p2pd run: starting (imports done)")
    try:
        trackers = [parse_hostport(t.strip()) for t in tracker.split(",") if t.strip()]
        listen_hp = parse_hostport(listen, default_host="0.0.0.0")
        egress = _rate_option("--egress-limit", egress_limit)
        ingress = _rate_option("--ingress-limit", ingress_limit)
        labels = dict(kv.split("=", 1) for kv in label)
        if zone is not None:
            labels["zone"] = zone
        traversal = _traversal_options(paths, relay, relay_listen, relay_rate, relay_max_pairs)
        auto = _auto_throttle_options(auto_throttle, link_capacity, reserve, auto_throttle_interface)
        metrics_hp = _hostport_option("--metrics-listen", metrics_listen)
        if not 0 < nat_check_every <= 3600:
            raise ValueError(f"--nat-check-every must be seconds in (0, 3600], not {nat_check_every:g}")
        if upload_slots < 0:
            raise ValueError(f"--upload-slots must be 0 (no cap) or a number of peers, not {upload_slots}")
    except ValueError as e:
        fail(str(e), ErrorCode.BAD_REQUEST)
    try:
        secret = read_join_secret(join_secret_file)
    except P2pdError as e:
        fail(e.message, e.code)
    if secret is None and not insecure:
        fail(NO_SECRET_HINT, ErrorCode.BAD_REQUEST)
    if secret is not None and insecure:
        fail("--insecure and a join secret were both given: pick one", ErrorCode.BAD_REQUEST)
    data = (data_dir or default_data_dir()).expanduser().resolve()
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create data dir {data}: {e.strerror}", ErrorCode.STORAGE)
    try:
        from p2pd.cache import parse_cache_max

        cache_cap = parse_cache_max(cache_max, data) if cache_max else None
    except ValueError as e:
        fail(str(e), ErrorCode.BAD_REQUEST)
    cfg = DaemonConfig(
        join_secret=secret,
        insecure=insecure,
        encrypt=encrypt,
        trusted_publishers=tuple(trust_publisher),
        unpack_user=unpack_user,
        trackers=trackers,
        listen=listen_hp,
        data_dir=data,
        egress_limit=egress,
        ingress_limit=ingress,
        advertise=advertise,
        labels=labels,
        tracker_wait=tracker_wait,
        traversal=traversal,
        auto_throttle=auto,
        metrics_listen=metrics_hp,
        cache_max=cache_cap,
        nat_check_every=nat_check_every,
        swarm=SwarmConfig(
            max_peers=max_peers,
            pipeline_depth=pipeline,
            stall_timeout=stall_timeout,
            compress=compress,
            upload_slots=upload_slots,
            chain=chain,
        ),
    )

    async def main() -> None:
        daemon = Daemon(cfg)

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    daemon.request_stop()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals)
            await daemon.run()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as e:  # report the root cause in one line; a traceback only at debug level
        leaves = leaf_exceptions(e)
        for leaf in leaves:
            if isinstance(leaf, P2pdError):
                fail(leaf.message, leaf.code)
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        logging.getLogger("p2pd").exception("daemon failed")
        fail(f"daemon failed: {leaves[0]!r}", ErrorCode.INTERNAL)


# ----------------------------------------------------------------------------------------- publish
@app.command()
def publish(
    path: Path = typer.Argument(..., help="file or directory to publish (seeded in place: do not modify it)"),
    name: str = typer.Option(..., "--name", help="NAME:TAG, e.g. llama-3-8b:v2"),
    data_dir: Path = DataDirOpt,
    socket: Path = SocketOpt,
) -> None:
    """Hash PATH, register it on the tracker as NAME:TAG and seed it."""
    if not path.exists():
        fail(f"{path} does not exist", ErrorCode.BAD_REQUEST)
    sock = socket_path(socket, data_dir)
    progress = Progress("hashing")
    res = run_client(
        lambda: call(
            sock, "publish", {"path": str(path.resolve()), "name": name}, timeout=120, on_event=progress.update
        )
    )
    progress.finish()
    typer.echo(
        f"published {res['name']} = {res['artifact_id']} ({format_size(res['size'])}, {res['pieces']} pieces)", err=True
    )
    typer.echo(res["artifact_id"])


# ----------------------------------------------------------------------------------------- fetch
@app.command()
def fetch(
    name: str = typer.Argument(..., help="NAME:TAG (or an artifact id)"),
    dest: Path = typer.Option(None, "--dest", help="directory to place the artifact in (default: the daemon's cache)"),
    data_dir: Path = DataDirOpt,
    socket: Path = SocketOpt,
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Download NAME:TAG through the swarm; exit 0 only when every byte is verified; print the path."""
    sock = socket_path(socket, data_dir)
    params: dict[str, Any] = {"name": name, "dest": str(dest.expanduser().resolve()) if dest else None}
    progress = Progress("fetching")
    res = run_client(lambda: call(sock, "fetch", params, timeout=900, on_event=progress.update))
    progress.finish()
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"{name}: {format_size(res['size'])} verified ({res['artifact_id'][:12]})", err=True)
    typer.echo(res.get("env_dir") or res["path"])


# ----------------------------------------------------------------------------------------- pack-env
@app.command("pack-env")
def pack_env(
    conda: Path = typer.Option(None, "--conda", help="prefix of a conda env to pack (conda-pack)"),
    venv: Path = typer.Option(None, "--venv", help="a virtualenv to pack (venv-pack)"),
    name: str = typer.Option(..., "--name", help="NAME:TAG to publish it as, e.g. infer-env:7"),
    fmt: str = typer.Option("tar.zst", "--format", help="tar.zst, tar.gz or tar"),
    out_dir: Path = typer.Option(
        None, "--out-dir", help="where the archive is kept and seeded from (default: DATA_DIR/packed)"
    ),
    data_dir: Path = DataDirOpt,
    socket: Path = SocketOpt,
) -> None:
    """Pack a conda env or venv and publish it as an env artifact (unpacked on arrival by fetchers)."""
    from p2pd import envpack
    from p2pd.protocol import manifest as mf

    if (conda is None) == (venv is None):
        fail("give exactly one of --conda PREFIX or --venv PATH", ErrorCode.BAD_REQUEST)
    try:
        mf.validate_name(name)
    except mf.ManifestError as e:
        fail(str(e), ErrorCode.BAD_REQUEST)
    out = (out_dir or (data_dir or default_data_dir()) / "packed").expanduser().resolve()
    progress = Progress("packing")
    t0 = time.monotonic()
    try:
        archive, meta = envpack.pack(
            conda=conda,
            venv=venv,
            out_dir=out,
            fmt=fmt,
            name=name.replace(":", "-").replace("/", "-"),
            progress=lambda d, t: progress.update({"phase": "packing", "bytes_done": d, "size": t}),
        )
    except envpack.EnvPackError as e:
        fail(str(e), ErrorCode.ENV)
    progress.finish()
    typer.echo(
        f"packed {conda or venv} into {archive} ({format_size(archive.stat().st_size)}) "
        f"in {time.monotonic() - t0:.1f} s",
        err=True,
    )
    sock = socket_path(socket, data_dir)
    hashing = Progress("hashing")
    res = run_client(
        lambda: call(
            sock,
            "publish",
            {"path": str(archive), "name": name, "kind": "env", "meta": meta},
            timeout=120,
            on_event=hashing.update,
        )
    )
    hashing.finish()
    described = ", ".join(f"{k}={v}" for k, v in meta.items())
    typer.echo(f"published {res['name']} = {res['artifact_id']} (env: {described})", err=True)
    typer.echo(res["artifact_id"])


# ----------------------------------------------------------------------------------------- status / stop
@app.command()
def status(
    data_dir: Path = DataDirOpt,
    socket: Path = SocketOpt,
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Artifacts, progress, peers and current rates of the running daemon."""
    sock = socket_path(socket, data_dir)
    res = run_client(lambda: call(sock, "status", {}, timeout=10))
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"p2pd node {res['node_id'][:12]} on {res['listen']}")
    for col in ("name", "id", "state", "progress", "size", "peers", "down", "up", "path"):
        t.add_column(col)
    for a in res["artifacts"]:
        pct = 100.0 * a["bytes_done"] / a["size"] if a["size"] else 100.0
        t.add_row(
            a["name"],
            a["artifact_id"][:12],
            a["state"],
            f"{pct:.1f}%",
            format_size(a["size"]),
            str(a["peers"]),
            format_rate(a["down_rate"]),
            format_rate(a["up_rate"]),
            a["path"],
        )
    Console().print(t)
    typer.echo(describe_limits(res))
    typer.echo(describe_nat(res.get("nat")))


def describe_limits(res: dict[str, Any]) -> str:
    """Per direction: the limit in force and why (`upload: 12.5 MB/s (auto: other traffic 140 Mbit/s)`)."""
    limits = res.get("limits")
    if not isinstance(limits, dict):
        return "limits: not reported (daemon older than auto-throttling)"
    lines = []
    for direction, word in (("egress", "upload"), ("ingress", "download")):
        lim = limits.get(direction) or {}
        rate = lim.get("limit")
        shown = "none" if rate is None else "paused" if rate == 0 else format_rate(rate)
        lines.append(f"{word} limit: {shown}" + ("" if rate is None else f" ({lim.get('why')})"))
    auto = res.get("auto_throttle") or {}
    if auto.get("state") == "off":
        lines.append(f"auto-throttle: off ({auto.get('why')})")
    elif auto:
        eg = auto.get("egress") or {}
        cap = eg.get("capacity")
        lines.append(
            f"auto-throttle: {auto.get('state')} on {auto.get('interface')}"
            + (f", link {format_rate(cap)}" if cap else ", learning the link capacity")
            + f"; upload: {eg.get('why')}; download: {(auto.get('ingress') or {}).get('why')}"
        )
    return "\n".join(lines)


def describe_nat(nat: dict[str, Any] | None) -> str:
    """One line for people: this node's NAT type and the address the public side sees it at."""
    if not nat:
        return "NAT: not reported (daemon older than NAT detection)"
    state = nat.get("state")
    if state == "off":
        return "NAT: not detected (the tracker offers no STUN server, or detection is off)"
    if state == "detecting":
        return "NAT: detecting..."
    mapped = nat.get("mapped")
    where = f"{mapped[0]}:{mapped[1]}" if mapped else "none (no STUN answer over UDP)"
    ago = nat.get("checked_s_ago")
    return (
        f"NAT: {nat.get('type')}; public address {where}"
        + (f" (checked {ago:.0f} s ago)" if isinstance(ago, int | float) else "")
        + (f"\n  why: {nat['reason']}" if nat.get("reason") else "")
    )


# ----------------------------------------------------------------------------------------- cache
@app.command("ls")
def ls_cmd(
    data_dir: Path = DataDirOpt,
    socket: Path = SocketOpt,
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """The artifacts on this node: size, last use, pinned, leased, seeding; and the cache's use and cap."""
    sock = socket_path(socket, data_dir)
    res = run_client(lambda: call(sock, "ls", {}, timeout=10))
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    cap = f" of {format_size(res['cache_max'])}" if res.get("cache_max") else " (no cap)"
    t = Table(title=f"cache: {format_size(res['cache_bytes'])}{cap}, {res['evictions']} evicted since start")
    for col in ("name", "id", "size", "state", "last use", "pinned", "leased by", "seeding", "where"):
        t.add_column(col)
    for a in res["artifacts"]:
        last = time.strftime("%Y-%m-%d %H:%M", time.localtime(a["last_used"])) if a.get("last_used") else "-"
        t.add_row(
            a["name"],
            a["artifact_id"][:12],
            format_size(a["size"]),
            a["state"],
            last,
            "yes" if a["pinned"] else "",
            ", ".join(a["leased_by"]),
            "yes" if a["seeding"] else "",
            "cache" if a["in_cache"] else "published in place",
        )
    Console().print(t)


@app.command("rm")
def rm_cmd(
    ref: str = typer.Argument(..., help="NAME:TAG, an artifact id or a unique id prefix"),
    force: bool = typer.Option(False, "--force", help="remove it even if pinned or in use"),
    data_dir: Path = DataDirOpt,
    socket: Path = SocketOpt,
) -> None:
    """Stop seeding an artifact and delete it from the cache (a published one's own files are never deleted)."""
    sock = socket_path(socket, data_dir)
    res = run_client(lambda: call(sock, "rm", {"ref": ref, "force": force}, timeout=60))
    typer.echo(f"removed {res['name']} ({res['artifact_id'][:12]}), freed {format_size(res['freed'])}", err=True)


@app.command("pin")
def pin_cmd(
    ref: str = typer.Argument(..., help="NAME:TAG, an artifact id or a unique id prefix"),
    data_dir: Path = DataDirOpt,
    socket: Path = SocketOpt,
) -> None:
    """Keep an artifact in the cache whatever --cache-max needs (until `p2pd unpin`)."""
    _set_pinned(ref, True, socket_path(socket, data_dir))


@app.command("unpin")
def unpin_cmd(
    ref: str = typer.Argument(..., help="NAME:TAG, an artifact id or a unique id prefix"),
    data_dir: Path = DataDirOpt,
    socket: Path = SocketOpt,
) -> None:
    """Let an artifact be evicted again when the cache needs room."""
    _set_pinned(ref, False, socket_path(socket, data_dir))


def _set_pinned(ref: str, pinned: bool, sock: Path) -> None:
    res = run_client(lambda: call(sock, "pin", {"ref": ref, "pinned": pinned}, timeout=10))
    typer.echo(f"{'pinned' if pinned else 'unpinned'} {res['name']} ({res['artifact_id'][:12]})", err=True)


@app.command()
def stop(data_dir: Path = DataDirOpt, socket: Path = SocketOpt) -> None:
    """Stop the daemon gracefully (as SIGTERM does)."""
    sock = socket_path(socket, data_dir)
    run_client(lambda: call(sock, "shutdown", {}, timeout=10))


@app.command()
def demo(
    nodes: int = typer.Option(4, "--nodes", help="daemons besides the seed"),
    size: str = typer.Option("2GiB", "--size", help="size of the generated artifact"),
    workdir: Path = typer.Option(None, "--workdir", help="where to put everything (default: a temp dir, removed)"),
    egress_limit: str = typer.Option(None, "--egress-limit", help="per-node upload cap, e.g. 100MB/s"),
) -> None:
    """Local demo: a tracker and several daemons on this machine share a generated multi-GB artifact."""
    from p2pd.demo import run_demo

    try:
        nbytes = parse_size(size)
    except ValueError as e:
        fail(f"--size: {e}", ErrorCode.BAD_REQUEST)
    try:  # checked here too: the daemons it is passed to would only say so in their log files
        _rate_option("--egress-limit", egress_limit)
    except ValueError as e:
        fail(str(e), ErrorCode.BAD_REQUEST)
    if nodes < 1:
        fail("--nodes must be at least 1", ErrorCode.BAD_REQUEST)
    code = run_demo(nodes=nodes, size=nbytes, workdir=workdir, egress_limit=egress_limit)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------- config
config_app = typer.Typer(no_args_is_help=True, help="The settings of `p2pd run`: file, environment, flags.")
app.add_typer(config_app, name="config")


@config_app.command(
    "show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h"]}
)
def config_show(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Print the settings `p2pd run` would use and where each comes from (flag, env, file, default).

    Extra arguments are read as `p2pd run` flags (`--config PATH` included), so
    `p2pd config show --config ./p2pd.toml --pipeline 4` shows what that command line would run with.
    """
    from p2pd import config_sources

    config_sources.show(typer.main.get_command(app).commands["run"], list(ctx.args), as_json)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------- helpers
def _traversal_options(
    paths: str, relay: bool, relay_listen: str, relay_rate: str | None, relay_max_pairs: int
) -> TraversalConfig:
    """The NAT traversal settings of `p2pd run`; ValueError names the option that is wrong."""
    chosen = tuple(p.strip() for p in paths.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PATHS]
    if unknown or not chosen:
        raise ValueError(
            f"--paths: unknown path(s) {', '.join(unknown) or '(none given)'}: use some of {','.join(PATHS)}"
        )
    if relay_max_pairs < 1:
        raise ValueError("--relay-max-pairs must be at least 1")
    try:
        listen = parse_hostport(relay_listen, default_host="0.0.0.0")
    except ValueError as e:
        raise ValueError(f"--relay-listen: {e}") from None
    return TraversalConfig(
        paths=chosen,
        offer_relay=relay,
        relay_listen=listen,
        relay_rate=_rate_option("--relay-rate", relay_rate),
        relay_max_pairs=relay_max_pairs,
    )


def _auto_throttle_options(on_off: str, capacity: str | None, reserve: str, iface: str | None) -> AutoThrottleConfig:
    if on_off not in ("on", "off"):
        raise ValueError(f"--auto-throttle {on_off!r}: write on or off")
    fraction, rate = AutoThrottleConfig.reserve_fraction, None
    text = reserve.strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"--reserve {reserve!r}: not a percentage; write e.g. 20% or a rate like 5MB/s") from None
        if not 0 <= pct < 100:
            raise ValueError(f"--reserve {reserve!r}: a share of the link from 0% to 99%")
        fraction = pct / 100
    else:
        rate = _rate_option("--reserve", text)
    if iface is not None and not (
        0 < len(iface) < 16 and iface.isprintable() and "/" not in iface and " " not in iface
    ):
        raise ValueError(f"--auto-throttle-interface {iface!r}: not an interface name (see `ip link`)")
    return AutoThrottleConfig(
        enabled=on_off == "on",
        interface=iface,
        link_capacity=_rate_option("--link-capacity", capacity),
        reserve_fraction=fraction,
        reserve_rate=rate,
    )


def _hostport_option(option: str, text: str | None) -> tuple[str, int] | None:
    """HOST:PORT of an optional listen option, None when not given; the error names the option."""
    if not text:
        return None
    try:
        return parse_hostport(text, default_host="0.0.0.0")
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


def _rate_option(option: str, text: str | None) -> float | None:
    """Bytes per second of a RATE option, None when not given; the error names the option."""
    if not text:
        return None
    try:
        return parse_rate(text)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


class Progress:
    """A rich bar on a terminal; otherwise a plain line every few seconds (logs, CI, pipes)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.task: Any = None
        self.last_line = 0.0

    def update(self, ev: dict[str, Any]) -> None:
        done, total = int(ev.get("bytes_done", 0)), int(ev.get("size", 0))
        phase = str(ev.get("phase", self.what))
        if self.tty:
            if self.bar is None:
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    TextColumn,
                    TimeRemainingColumn,
                    TransferSpeedColumn,
                )
                from rich.progress import Progress as RichProgress

                self.bar = RichProgress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    transient=False,
                )
                self.bar.start()
                self.task = self.bar.add_task(phase, total=total or None)
            desc = phase + (f" · {ev['peers']} peers" if "peers" in ev else "")
            self.bar.update(self.task, completed=done, total=total or None, description=desc)
        elif time.monotonic() - self.last_line >= 2.0:
            self.last_line = time.monotonic()
            pct = 100.0 * done / total if total else 0.0
            rate = f", {format_rate(ev['down_rate'])}" if "down_rate" in ev else ""
            peers = f", {ev['peers']} peers" if "peers" in ev else ""
            print(f"{phase}: {pct:5.1f}% of {format_size(total)}{rate}{peers}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
