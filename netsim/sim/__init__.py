"""A flow-level simulator of p2pd swarms at scale, running the daemon's own sans-IO rules (docs/simulator.md)."""
