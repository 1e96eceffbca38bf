"""Pick ports for the balancer and workers: skip ports that are taken or in --skip-ports, and say so."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field


def port_is_free(host: str, port: int) -> bool:
    """True when a server could bind (host, port) now (SO_REUSEADDR, as servers set it: TIME_WAIT is fine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


@dataclass
class PortAllocator:
    """Hands out distinct free ports on one host; remembers every substitution for the launch report."""

    host: str
    skip: frozenset[int] = frozenset()
    taken: set[int] = field(default_factory=set)
    substitutions: list[str] = field(default_factory=list)

    def take(self, wanted: int, who: str) -> int:
        """`wanted` if usable, else the next usable port above it (recorded in `substitutions`)."""
        port = wanted
        reasons: list[str] = []
        while True:
            if port > 65535:
                raise OSError(f"no free port at or above {wanted} for {who}")
            if port in self.skip:
                reasons.append(f"{port} is in --skip-ports")
            elif port in self.taken:
                reasons.append(f"{port} is used by this launch")
            elif not port_is_free(self.host, port):
                reasons.append(f"{port} is taken")
            else:
                break
            port += 1
        self.taken.add(port)
        if port != wanted:
            self.substitutions.append(f"{who}: port {port} instead of {wanted} ({'; '.join(reasons)})")
        return port

    def take_run(self, base: int, count: int, who: str) -> list[int]:
        """`count` ports for `who 0..count-1`: worker i gets base+i unless an earlier one had to move up."""
        ports: list[int] = []
        for i in range(count):
            start = max(base + i, ports[-1] + 1) if ports else base
            ports.append(self.take(start, f"{who} {i}"))
        return ports
