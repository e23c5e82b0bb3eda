"""Sans-IO core: pure state and bytes, shared by the daemon and the simulator.

Nothing in this package opens a socket, touches a file or reads a clock; callers pass time in.
"""
