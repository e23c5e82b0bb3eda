"""The topology builder: it deletes everything it made, also when the body of the `with` fails; links shape;
NAT routers translate."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from netsim.emu import EmuError, Topology, list_namespaces

pytestmark = pytest.mark.emu

SERVER = (
    "import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],9000));s.listen();print('L',flush=True)\n"
    "while True:\n c,a=s.accept();c.sendall(a[0].encode());c.close()\n"
)
CLIENT = "import socket,sys\nc=socket.create_connection((sys.argv[1],9000),timeout=2)\nprint(c.recv(100).decode())\n"


def test_cleanup_on_exception(iptables: None) -> None:
    """An exception inside the context: processes stopped, namespaces (and so veths, bridge) gone."""
    with pytest.raises(RuntimeError, match="boom"), Topology() as topo:
        lan = topo.add_switch("lan")
        a = topo.add_host("a", lan, rate=10_000_000)
        topo.add_host("b", lan, rate=10_000_000, loss=0.01)
        sleeper = a.popen(["sleep", "300"])
        names = topo.namespaces()
        assert len(names) == 3 and all(n in list_namespaces() for n in names)
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert not [n for n in list_namespaces() if n.startswith(topo.prefix)]
    with pytest.raises(EmuError):
        topo.add_host("c")  # a closed topology refuses to build


def test_cleanup_on_failed_build(emu: None) -> None:
    """A command that fails half-way through building leaves nothing of this topology behind, and deletes only
    what it created itself (here: a name clash with another topology's namespace)."""
    with Topology() as first:
        lan = first.add_switch("lan")
        first.add_host("a", lan)
        with pytest.raises(EmuError, match="netns add"), Topology(prefix=first.prefix) as second:
            second.add_host("b")
            second.add_host("a")  # exists already (first's): `ip netns add` fails
        assert f"{first.prefix}-b" not in list_namespaces()
        assert f"{first.prefix}-a" in list_namespaces()  # not second's to delete
    assert not [n for n in list_namespaces() if n.startswith(first.prefix)]


def test_cleanup_on_sigterm(emu: None) -> None:
    """SIGTERM to a driver that holds a topology: it unwinds, deletes its namespaces, exits 143."""
    code = (
        "import time\nfrom netsim.emu import Topology, Terminated\n"
        "try:\n with Topology() as t:\n  lan=t.add_switch('lan'); t.add_host('a', lan); t.add_host('b', lan)\n"
        "  print(t.prefix, flush=True); time.sleep(60)\nexcept Terminated: raise SystemExit(143)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    prefix = p.stdout.readline().strip()
    assert any(n.startswith(prefix) for n in list_namespaces())
    p.terminate()
    assert p.wait(timeout=30) == 143
    assert not [n for n in list_namespaces() if n.startswith(prefix + "-")]


def test_shaping_limits_rate(emu: None) -> None:
    """A 20 Mbit/s link carries ~20 Mbit/s of TCP (tbf works; no netem needed)."""
    with Topology() as topo:
        lan = topo.add_switch("lan")
        a = topo.add_host("a", lan, rate=20_000_000)
        b = topo.add_host("b", lan, rate=200_000_000)
        assert a.ip is not None
        srv = a.popen(
            [
                sys.executable,
                "-c",
                "import socket,sys\ns=socket.socket();s.bind((sys.argv[1],9000));"
                "s.listen();c,_=s.accept()\nwhile c.recv(1<<20): pass\n",
                a.ip,
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        send = (
            "import socket,sys,time\nc=socket.create_connection((sys.argv[1],9000));b=bytes(1<<20);"
            "t=time.time()\nfor _ in range(8): c.sendall(b)\nc.close();print(time.time()-t)\n"
        )
        tx0 = b.counters()["tx_bytes"]
        t = float(b.run([sys.executable, "-c", send, a.ip]).stdout)
        srv.wait(timeout=10)
        sent = b.counters()["tx_bytes"] - tx0
        mbit = 8 * (8 << 20) / t / 1e6
        assert sent >= 8 << 20
        assert 12 < mbit < 25, f"{mbit:.1f} Mbit/s through a 20 Mbit/s link"
        assert json.loads(json.dumps(a.counters()))["rx_bytes"] >= 8 << 20


def test_nat_router(iptables: None) -> None:
    """A host behind a cone NAT reaches the public side from the router's address; the public side cannot
    connect in."""
    with Topology() as topo:
        wan = topo.add_switch("wan")
        lan = topo.add_switch("lan")
        pub = topo.add_host("pub", wan)
        router = topo.add_router("nat", wan, lan, nat="cone")
        inner = topo.add_host("inner", lan, gateway=router)
        assert pub.ip is not None and inner.ip is not None
        pub.popen([sys.executable, "-c", SERVER, pub.ip], stdout=subprocess.PIPE)
        inner.popen([sys.executable, "-c", SERVER, inner.ip], stdout=subprocess.PIPE)
        time.sleep(0.5)
        seen = inner.run([sys.executable, "-c", CLIENT, pub.ip]).stdout.strip()
        assert seen == router.ip  # translated to the router's WAN address
        cp = pub.run([sys.executable, "-c", CLIENT, inner.ip], check=False)
        assert cp.returncode != 0  # no route in: the LAN is not reachable from outside
