"""Discovery (--discover HOST:PORT-PORT): find running workers by scanning port ranges in the background.

Each scan first sweeps the ports with non-blocking TCP connects in a worker thread (a refused port costs the
kernel a few microseconds and the event loop nothing), then sends the health checker's /health probe to the
ports that accepted and are not workers yet. Those that answer like a worker are added, marked `discovered`;
from then on the normal health checks own them, and a discovered worker whose probes fail
--unhealthy-threshold times is forgotten (health.py) rather than kept as a dead row. A thousand-port range
thus never slows the request path: the loop only sees the few ports that are open.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import selectors
import socket
import time
import typing
from collections.abc import Iterable

from lb.backends import BackendPool
from lb.health import HealthChecker, ProbeFailed
from lb.settings import ConfigError

log = logging.getLogger("lb.discovery")
SWEEP_BATCH = 256  # sockets open at once during a sweep
PROBE_CONCURRENCY = 16  # /health probes of open ports at once


def parse_ranges(specs: Iterable[str], skip: Iterable[str]) -> list[tuple[str, list[int]]]:
    """`HOST:PORT-PORT` / `HOST:PORT` specs, less the skipped ports: [(host, ports)]; ConfigError if bad."""
    skipped: set[int] = set()
    for item in skip:
        skipped.update(_ports("discover_skip_ports", item))
    out: list[tuple[str, list[int]]] = []
    for spec in specs:
        host, sep, ports = spec.strip().rpartition(":")
        if not sep or not host:
            raise ConfigError(f"discover: {spec!r} is not HOST:PORT-PORT or HOST:PORT")
        out.append((host.strip("[]"), [p for p in _ports("discover", ports) if p not in skipped]))
    return out


def _ports(key: str, text: str) -> range:
    first, _, last = text.strip().partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not PORT or PORT-PORT") from None
    if not 1 <= low <= high <= 65535:
        raise ConfigError(f"{key}: {text!r} is not a range of TCP ports (1-65535, low first)")
    return range(low, high + 1)


def open_ports(host: str, ports: list[int], timeout: float) -> list[int]:
    """The ports of `host` that accept a TCP connection within `timeout` s (blocking: run it in a thread)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0]
    except OSError:
        return []
    found: list[int] = []
    for start in range(0, len(ports), SWEEP_BATCH):
        selector = selectors.DefaultSelector()
        for port in ports[start : start + SWEEP_BATCH]:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            err = sock.connect_ex((address[0], port, *address[2:]))
            if err == 0:
                found.append(port)
                sock.close()
            elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                selector.register(sock, selectors.EVENT_WRITE, port)
            else:
                sock.close()  # refused at once: nothing listens there
        deadline = time.monotonic() + timeout
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = typing.cast(socket.socket, key.fileobj)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    found.append(key.data)
                selector.unregister(sock)
                sock.close()
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
    return sorted(found)


class Discovery:
    def __init__(
        self,
        pool: BackendPool,
        health: HealthChecker,
        ranges: list[tuple[str, list[int]]],
        interval: float,
        timeout: float,
        own: tuple[str, int],
    ) -> None:
        self._pool = pool
        self._health = health
        self._ranges = ranges
        self.interval = interval
        self._timeout = timeout
        self._own = own  # the balancer's own host and port: never probed, never added to itself
        self.scans = 0

    async def run(self) -> None:
        """Scan every interval until cancelled."""
        while True:
            try:
                await self.scan()
            except Exception:  # a task's outer edge: log, keep scanning
                log.exception("discovery scan failed")
            await asyncio.sleep(self.interval)

    async def scan(self) -> int:
        """One sweep of every range; returns how many workers it added."""
        found: list[str] = []
        for host, ports in self._ranges:
            for port in await asyncio.to_thread(open_ports, host, ports, self._timeout):
                if not self._is_own(host, port):
                    found.append(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
        known = {b.url for b in self._pool.backends}
        limit = asyncio.Semaphore(PROBE_CONCURRENCY)
        added = await asyncio.gather(*(self._probe(url, limit) for url in found if url not in known))
        self.scans += 1
        return sum(added)

    def _is_own(self, host: str, port: int) -> bool:
        own_host, own_port = self._own
        local = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::")
        return port == own_port and (host == own_host or (host in local and own_host in local))

    async def _probe(self, url: str, limit: asyncio.Semaphore) -> bool:
        async with limit:
            try:
                models, body = await self._health.probe_body(url)
            except ProbeFailed:
                return False  # open but not a worker (or not ready yet): asked again next scan
        if isinstance(body, dict) and "healthy_workers" in body:
            return False  # another balancer (or this one behind another address): not a worker
        if self._pool.find_url(url) is not None:
            return False
        backend = self._pool.add(url, models)
        backend.discovered = True
        backend.ever_healthy = True
        backend.consecutive_successes = 1
        self._pool.set_health(backend, True)
        log.info(
            "backend %d %s discovered (models: %s)", backend.index, url, ", ".join(sorted(models)) or "?"
        )
        return True
