"""netsim: prove p2pd on real emulated networks and measure it against the bound and other systems.

- `netsim.emu`: real processes in Linux network namespaces, every link shaped with tc (tbf), optional random
  loss (iptables statistic), NAT routers; a context manager that always deletes what it made.
- `netsim.bench`: `python -m netsim.bench swarm|pair` -- side-by-side benchmarks (p2pd, libtorrent, aria2,
  nginx+curl) against the Kumar-Ross lower bound; each prints one JSON object and a headline line.
"""
