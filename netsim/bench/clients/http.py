"""The HTTP baseline: nginx in the seed's namespace, one curl per leecher (what a user without P2P would do).

nginx serves the payload with sendfile and 2 workers (this machine has 2 cores); curl writes to tmpfs like every
other client. The seed sends N·F, so on a shaped network this is the N·F/u_seed line the P2P systems must beat.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from netsim.bench.clients.base import Client
from netsim.bench.harness import (
    BenchError,
    Ctx,
    GatedProcess,
    Leecher,
    RunResult,
    release_and_wait,
    stop_all,
    tail,
    wait_until,
)

HTTP_PORT = 8089


def nginx_conf(d: str, listen: str, root: str) -> str:
    """A self-contained nginx config (pid, logs and temp files in `d`; foreground, so we hold the master's PID)."""
    return f"""daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on; sendfile_max_chunk 0;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  types {{ application/octet-stream bin; }}
  server {{ listen {listen}; root {root}; }}
}}
"""


def start_nginx(ctx: Ctx, d: str, ip: str, port: int) -> subprocess.Popen:
    """nginx serving the payload's folder on ip:port in the seed's namespace; returns once it listens."""
    os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_conf(d, f"{ip}:{port}", os.path.dirname(ctx.payload)))
    p = ctx.net.seed.host.popen(["nginx", "-p", d, "-c", conf], log=os.path.join(d, "nginx.err"))
    pidfile = os.path.join(d, "nginx.pid")  # written after the listening sockets are open
    wait_until(lambda: os.path.exists(pidfile) or p.poll() is not None, 15, "nginx pid file")
    if p.poll() is not None:
        raise BenchError(f"nginx exited {p.returncode}: {tail(os.path.join(d, 'nginx-error.log'))}")
    return p


def curl_argv(url: str, out: str) -> list[str]:
    """curl that fails on HTTP errors and never uses a proxy."""
    return ["curl", "-sS", "--fail", "--noproxy", "*", "-o", out, url]


class Http(Client):
    """nginx + curl."""

    name = "http"

    def missing(self) -> str | None:
        for tool, pkg in (("nginx", "nginx-light"), ("curl", "curl")):
            if not shutil.which(tool):
                return f"{tool} not found (apt-get install {pkg})"
        return None

    def run(self, ctx: Ctx, run: int) -> RunResult:
        d = ctx.run_dir(self.name, run)
        procs: list[subprocess.Popen] = []
        try:
            seed = ctx.net.seed
            procs.append(start_nginx(ctx, d, seed.ip, HTTP_PORT))
            url = f"http://{seed.ip}:{HTTP_PORT}/{os.path.basename(ctx.payload)}"
            leechers: list[Leecher] = []
            for n in ctx.net.leechers:
                out = os.path.join(d, f"{n.name}.bin")
                lc = GatedProcess(n, out, curl_argv(url, out), d, n.name)
                procs.append(lc.proc)
                leechers.append(lc)
            for gated in leechers:
                assert isinstance(gated, GatedProcess)
                gated.wait_ready()
            ctx.rss_pids = [procs[0].pid]
            return release_and_wait(ctx, self.name, run, leechers)
        finally:
            stop_all(ctx.net.topo, procs)
            ctx.finish_run_dir(d)
