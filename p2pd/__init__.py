"""p2pd: peer-to-peer distribution of multi-GB models and packed environments."""

__version__ = "0.1.0"
