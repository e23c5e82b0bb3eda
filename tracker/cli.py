"""`p2p-tracker`: run a tracker (`serve`) or administer one (`admin ...`).

`serve` runs every front end in one trio nursery: TCP RPC, UDP heartbeats and STUN on `--listen`
(STUN elsewhere with `--stun`, CHANGE-REQUEST with `--stun-alt`), the HTTP admin API on
`--admin-listen`. SIGTERM and SIGINT cancel that nursery, so the process exits 0 after
closing its sockets (a supervisor stopping the tracker is not an error). Logs go to stderr.

`admin` commands talk to the HTTP admin API with a bearer token and print rich tables (or `--json`
for scripts). Errors a person can act on (tracker unreachable, bad token, unknown node) are printed
as one line, never as a traceback, with the exit status of their code (`ErrorCode.exit_status`, the
table in docs/interfaces.md).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from p2pd.config_sources import TRACKER_SERVE, configured
from p2pd.errors import ErrorCode, P2pdError
from p2pd.identity import token_value
from p2pd.rpc import parse_hostport
from p2pd.units import parse_size
from tracker.config import RelayOptions, TrackerConfig, TrackerLimits

if TYPE_CHECKING:
    from tracker.stun import StunSettings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="p2pd tracker: node registry, peer lists, names.",
)
log = logging.getLogger("tracker")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command(cls=configured(TRACKER_SERVE))  # every option is also a key of /etc/p2pd/tracker.toml
def serve(
    listen: Annotated[
        str, typer.Option(help="TCP RPC and UDP heartbeats on HOST:PORT (port 0: any free port).")
    ] = "{}:{}".format(*TrackerConfig.listen),
    interval: Annotated[
        float, typer.Option(help="Heartbeat interval told to nodes, seconds; 3 missed = dropped.")
    ] = TrackerConfig.interval,
    store: Annotated[
        str, typer.Option(help="'memory' or redis://HOST:PORT/DB (replicas share a Redis).")
    ] = TrackerConfig.store,
    admin_listen: Annotated[str | None, typer.Option(help="HTTP admin API on HOST:PORT (off when not given).")] = None,
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="P2P_TRACKER_ADMIN_TOKEN", help="Bearer token for the admin API, or @FILE to read it from."
        ),
    ] = None,
    store_prefix: Annotated[
        str, typer.Option(help="Key prefix in Redis (one per tracker group sharing a Redis).")
    ] = TrackerConfig.store_prefix,
    udp: Annotated[bool, typer.Option(help="Accept UDP heartbeats on the listen port.")] = TrackerConfig.udp,
    stun: Annotated[
        str | None,
        typer.Option(
            help="STUN for NAT detection: HOST:PORT of its own, or 'off' (default: the listen address, "
            "sharing the UDP port with heartbeats)."
        ),
    ] = None,
    stun_alt: Annotated[
        str | None,
        typer.Option(
            help="Second IP:PORT for RFC 3489 CHANGE-REQUEST, so nodes can classify their NAT; IP and port "
            "must both differ from the primary STUN address (a specific IP, not 0.0.0.0)."
        ),
    ] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option(help="Write {tcp_port, udp_port, admin_port, relay_port, pid} as JSON here once listening."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    relay: Annotated[
        bool, typer.Option(help="Relay bytes between nodes that cannot reach each other otherwise.")
    ] = True,
    relay_listen: Annotated[
        str | None, typer.Option(help="The relay's TCP HOST:PORT (default: the --listen host, any free port).")
    ] = None,
    relay_advertise: Annotated[
        str | None, typer.Option(help="Host nodes dial for the relay (default: the address each reached us at).")
    ] = None,
    relay_rate: Annotated[
        str | None, typer.Option(help="Cap on all relayed bytes, e.g. 100MB/s (default: none).")
    ] = None,
    relay_max_pairs: Annotated[int, typer.Option(help="Node pairs relayed at once, waiting ones included.")] = 64,
    relay_idle_timeout: Annotated[float, typer.Option(help="Close a relayed pair silent this long (s).")] = 60.0,
    join_secret_file: Annotated[
        Path | None,
        typer.Option(
            help="The cluster's join secret (or $P2PD_JOIN_SECRET_FILE / $P2PD_JOIN_SECRET): only nodes that "
            "hold it register, resolve names or fetch (docs/security.md)."
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Run an open tracker: any host may register, heartbeat or resolve (a lab only).")
    ] = False,
    publishers: Annotated[
        Path | None,
        typer.Option(help="JSON file of the nodes that may publish, each with its name prefixes (docs/security.md)."),
    ] = None,
    max_publisher_bytes: Annotated[
        str,
        typer.Option(help="Bytes of manifests one publisher (signing node) may hold here in all, e.g. 1GiB."),
    ] = f"{TrackerLimits.max_publisher_bytes >> 20}MiB",
) -> None:
    """Run a tracker until SIGTERM or SIGINT."""
    setup_logging(log_level)
    from p2pd.identity import cluster_secret

    try:
        host, port = parse_hostport(listen, default_host="0.0.0.0")
        admin_addr = parse_hostport(admin_listen) if admin_listen else None
        stun_settings = stun_options(stun, stun_alt, (host, port))
        relay_opts = _relay_options(
            relay,
            relay_listen or f"{listen.rpartition(':')[0] or '0.0.0.0'}:0",
            relay_advertise,
            relay_rate,
            relay_max_pairs,
            relay_idle_timeout,
        )
        try:
            publisher_bytes = parse_size(max_publisher_bytes)
        except ValueError as e:
            raise ValueError(f"--max-publisher-bytes: {e}") from None
    except ValueError as e:
        fail(str(e), ErrorCode.BAD_REQUEST)
    if interval <= 0:
        fail("--interval must be positive", ErrorCode.BAD_REQUEST)
    try:
        admin_token = token_value(admin_token, "--admin-token")
    except P2pdError as e:
        fail(e.message, e.code)
    if admin_addr is not None and not admin_token:
        fail(
            "--admin-listen needs --admin-token (or $P2P_TRACKER_ADMIN_TOKEN): the admin API never runs open",
            ErrorCode.BAD_REQUEST,
        )
    from tracker.publishers import Publishers

    try:
        join = cluster_secret(join_secret_file, insecure)
        scopes = Publishers.load(publishers) if publishers is not None else None
    except P2pdError as e:
        fail(e.message, e.code)
    if scopes is not None and join is None:
        fail("--publishers needs a join secret: an open tracker cannot tell publishers apart", ErrorCode.BAD_REQUEST)

    import trio

    raise_fd_limit()
    error: P2pdError | None = None
    try:
        config = TrackerConfig(
            listen=(host, port),
            interval=interval,
            store=store,
            store_prefix=store_prefix,
            admin_listen=admin_addr,
            admin_token=admin_token,
            udp=udp,
            ready_file=ready_file,
            stun=stun_settings,
            relay=relay_opts,
            join=join,
            publishers=scopes,
            limits=TrackerLimits(max_publisher_bytes=publisher_bytes),
        )
        trio.run(_serve, config)
    except* OSError as eg:  # raised inside the nursery, so it may come wrapped in a group
        where = listen + (f" (admin {admin_listen})" if admin_listen else "")
        if relay_opts is not None:
            where += f" (relay {relay_listen or 'on any free port'})"
        error = P2pdError(ErrorCode.CONFLICT, f"cannot listen on {where}: {_leaf(eg)}")
    except* StoreError as eg:
        leaf = _leaf(eg)
        assert isinstance(leaf, StoreError)
        error = leaf
    if error is not None:
        fail(error.message, error.code)


@app.command("new-secret")
def new_secret(
    path: Annotated[Path, typer.Argument(help="File to create (mode 0600; it must not exist yet).")],
) -> None:
    """Write a new cluster join secret to PATH: give the same file to the tracker and every node."""
    from p2pd.identity import write_join_secret

    try:
        write_join_secret(path)
    except FileExistsError:
        fail(
            f"{path} already exists: a new secret would lock out every node that holds the old one", ErrorCode.CONFLICT
        )
    except OSError as e:
        fail(f"cannot create {path}: {e.strerror}", ErrorCode.STORAGE)
    print(f"wrote a new join secret to {path} (mode 0600)")


def stun_options(stun: str | None, stun_alt: str | None, listen: tuple[str, int]) -> StunSettings | None:
    """--stun / --stun-alt as settings (None: STUN off); ValueError says what is wrong."""
    from tracker.stun import StunSettings, check_settings

    if stun is not None and stun.strip().lower() == "off":
        if stun_alt:
            raise ValueError("--stun-alt needs STUN on: drop --stun off")
        return None
    own = alt = None
    try:
        own = parse_hostport(stun, default_host=listen[0]) if stun else None
    except ValueError as e:
        raise ValueError(f"--stun: {e}, or 'off'") from None
    try:
        alt = parse_hostport(stun_alt) if stun_alt else None
    except ValueError as e:
        raise ValueError(f"--stun-alt: {e}") from None
    primary = own or listen
    if alt is not None and own is None and primary[1] == 0:
        raise ValueError("--stun-alt with --listen port 0: give the primary STUN address with --stun IP:PORT")
    check_settings(primary, alt)
    return StunSettings(listen=own, alt=alt)


def _relay_options(
    on: bool, listen: str, advertise: str | None, rate: str | None, max_pairs: int, idle_timeout: float
) -> RelayOptions | None:
    """The relay's settings from the flags (None: --no-relay); ValueError names the bad flag."""
    if not on:
        return None
    from p2pd.units import parse_rate

    host, port = parse_hostport(listen, default_host="0.0.0.0")
    try:
        bps = parse_rate(rate) if rate else None
    except ValueError as e:
        raise ValueError(f"--relay-rate: {e}") from None
    if max_pairs < 1:
        raise ValueError("--relay-max-pairs must be at least 1 (use --no-relay to run no relay)")
    if idle_timeout <= 0:
        raise ValueError("--relay-idle-timeout must be positive")
    return RelayOptions(host, port, advertise, bps, max_pairs, idle_timeout)


class StoreError(P2pdError):
    """The store given with --store cannot be used: an unknown spec, or its Redis does not answer."""


async def open_store(spec: str, interval: float, prefix: str = TrackerConfig.store_prefix) -> Any:
    from tracker.store import MemoryStore

    if spec == "memory":
        return MemoryStore(interval)
    if spec.startswith("redis://"):
        from tracker.redis_store import RedisStore, RedisUnavailable

        try:
            return await RedisStore.connect(spec, interval, prefix=prefix)
        except RedisUnavailable as e:
            raise StoreError(ErrorCode.UNREACHABLE, str(e)) from e
    raise StoreError(ErrorCode.BAD_REQUEST, f"unknown --store {spec!r}: expected 'memory' or redis://HOST:PORT/DB")


async def _serve(config: TrackerConfig) -> None:
    import trio

    from p2pd.sd_notify import Notifier
    from tracker.membership import Membership
    from tracker.server import TrackerServer, fmt_hostport

    notify = Notifier()  # systemd's Type=notify (a no-op without $NOTIFY_SOCKET)
    host, port = config.listen
    interval, udp, ready_file = config.interval, config.udp, config.ready_file
    admin_addr, admin_token = config.admin_listen, config.admin_token
    relay = config.relay
    store = await open_store(config.store, interval, config.store_prefix)
    membership = Membership(config.join) if config.join is not None else None
    server = TrackerServer(
        store, stun=config.stun, membership=membership, publishers=config.publishers, limits=config.limits
    )
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                tcp_port, udp_port = await nursery.start(server.serve, host, port, udp)
                relay_port: int | None = None
                if relay is not None:
                    own = server.signals.own_relay(
                        rate=relay.rate,
                        max_pairs=relay.max_pairs,
                        idle_timeout=relay.idle_timeout,
                        advertise=relay.advertise,
                    )
                    relay_port = int(await nursery.start(own.serve, relay.host, relay.port))
                admin_port: int | None = None
                if admin_addr is not None:
                    from tracker.admin import serve_admin

                    admin_port = await nursery.start(serve_admin, server, admin_addr[0], admin_addr[1], admin_token)
                log.info(
                    "tracker listening on %s (tcp rpc%s), store %s, interval %gs%s%s",
                    fmt_hostport(host, tcp_port),
                    f", udp heartbeats :{udp_port}" if udp_port else "",
                    store.kind,
                    interval,
                    f", admin http on {fmt_hostport(admin_addr[0], admin_port)}"
                    if admin_addr is not None and admin_port is not None
                    else "",
                    _describe_stun(server),
                )
                if membership is None:
                    log.warning("an open tracker (--insecure): any host that reaches it can join the cluster")
                else:
                    log.info("secured cluster: join secret %s…", config.join.fingerprint[:8] if config.join else "")
                if relay is not None and relay_port is not None:
                    log.info(
                        "relay on %s (%s, at most %d pairs)",
                        fmt_hostport(relay.host, relay_port),
                        f"{relay.rate / 1e6:.1f} MB/s" if relay.rate else "no rate cap",
                        relay.max_pairs,
                    )
                if ready_file is not None:
                    tmp = ready_file.with_name(ready_file.name + ".tmp")
                    tmp.write_text(
                        json.dumps(
                            {
                                "tcp_port": tcp_port,
                                "udp_port": udp_port,
                                "admin_port": admin_port,
                                "stun": server.stun_advert(),
                                "relay_port": relay_port,
                                "pid": os.getpid(),
                            }
                        )
                    )
                    tmp.replace(ready_file)
                notify.ready(f"serving on {fmt_hostport(host, tcp_port)}, store {store.kind}")
                nursery.start_soon(notify.watchdog)
                async for sig in signals:
                    log.info("received %s: shutting down", signal.Signals(sig).name)
                    notify.stopping()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await store.aclose()


def _describe_stun(server: Any) -> str:
    if server.stun is None:
        return ", stun off"
    from tracker.server import fmt_hostport

    r = server.stun.responder
    where = fmt_hostport(*r.primary)
    if r.alt is None:
        return f", stun on {where} (no --stun-alt: mapped addresses only, no NAT classification)"
    return f", stun on {where} with CHANGE-REQUEST from {fmt_hostport(*r.alt)}"


def _leaf(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


def raise_fd_limit() -> None:
    """One TCP connection per node that talks to us now: lift the soft fd limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %s: %s", soft, e)


config_app = typer.Typer(no_args_is_help=True, help="The settings of `p2p-tracker serve`: file, environment, flags.")
app.add_typer(config_app, name="config")


@config_app.command(
    "show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h"]}
)
def config_show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print the settings `p2p-tracker serve` would use and where each comes from (flag, env, file, default).

    Extra arguments are read as `serve` flags (`--config PATH` included).
    """
    from p2pd import config_sources

    config_sources.show(typer.main.get_command(app).commands["serve"], list(ctx.args), as_json)  # type: ignore[attr-defined]


def fail(msg: str, code: ErrorCode) -> NoReturn:
    typer.echo(f"p2p-tracker: error: {msg}", err=True)
    raise typer.Exit(code.exit_status)


def main() -> None:
    from tracker.admin_cli import admin_app

    app.add_typer(admin_app, name="admin")
    app()


if __name__ == "__main__":
    main()
