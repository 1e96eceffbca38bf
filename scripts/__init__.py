"""The launcher: start workers and the balancer on one machine, watch them, stop them (Python API + CLI)."""
