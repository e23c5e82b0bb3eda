"""Side-by-side benchmarks: `python -m netsim.bench swarm ...` and `python -m netsim.bench pair ...`.

Each prints one JSON object and a one-line headline; results with their exact command lines live in BENCHMARKS.md.
"""
