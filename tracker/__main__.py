"""`python -m tracker` is `p2p-tracker` (for checkouts where the console script is not installed)."""

from tracker.cli import main

main()
