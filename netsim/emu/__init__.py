"""Real processes in emulated networks (Linux network namespaces, tc tbf shaping, iptables loss and NAT).

See `topology.py` for why it is built the way it is. Needs root and iproute2 (`ip`, `tc`); iptables for loss and
NAT. `python -m netsim.emu list|cleanup` shows or deletes namespaces left by a run that was SIGKILLed.
"""

from netsim.emu.nat import NAT_KINDS, add_nat_site
from netsim.emu.topology import (
    EmuError,
    Host,
    Link,
    Switch,
    Terminated,
    Topology,
    list_namespaces,
    new_prefix,
    reap_stale,
    stale_namespaces,
)

__all__ = [
    "NAT_KINDS",
    "EmuError",
    "Host",
    "Link",
    "Switch",
    "Terminated",
    "Topology",
    "add_nat_site",
    "list_namespaces",
    "new_prefix",
    "reap_stale",
    "stale_namespaces",
]
