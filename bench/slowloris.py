"""Slowloris: many connections that each trickle a request head one byte at a time and never finish it.

A benchmark instrument (bench/soak.py's slowloris mode): it measures what such clients cost the balancer's
honest users. Every connection sends a plausible head (`POST /v1/chat/completions HTTP/1.1`, a Host, a long
header that never ends) one byte per `interval` seconds; when the balancer closes one (its --header-timeout),
it is counted and opened again, so the pressure stays constant for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\nX-Pad: "
CONNECT_TIMEOUT_S = 10.0


@dataclass
class SlowlorisStats:
    connections: int = 0  # opened, reopenings included
    closed_by_server: int = 0  # the balancer cut a trickling connection (e.g. its header deadline)
    refused: int = 0  # could not connect (e.g. over --max-connections)
    open_now: int = 0
    peak_open: int = 0


class Slowloris:
    """`count` trickling connections to host:port until `stop()`."""

    def __init__(self, host: str, port: int, count: int, interval: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.count = count
        self.interval = interval
        self.stats = SlowlorisStats()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, ramp_s: float = 2.0) -> None:
        """Open the connections over `ramp_s` seconds (a burst of 1,000 SYNs would overflow the backlog)."""
        for i in range(self.count):
            self._tasks.append(asyncio.create_task(self._one()))
            if i % 50 == 49:
                await asyncio.sleep(ramp_s * 50 / self.count)

    async def stop(self) -> SlowlorisStats:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return self.stats

    async def _one(self) -> None:
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
            except (OSError, TimeoutError):
                self.stats.refused += 1
                await asyncio.sleep(self.interval)
                continue
            self.stats.connections += 1
            self.stats.open_now += 1
            self.stats.peak_open = max(self.stats.peak_open, self.stats.open_now)
            try:
                await self._trickle(reader, writer)
            finally:
                self.stats.open_now -= 1
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        while not self._stopping.is_set():
            if reader.at_eof() or writer.is_closing():
                self.stats.closed_by_server += 1
                return
            try:
                writer.write(HEAD[sent : sent + 1] if sent < len(HEAD) else b"x")  # the head never ends
                await writer.drain()
            except (ConnectionError, OSError):
                self.stats.closed_by_server += 1
                return
            sent += 1
            # an answer (a 408/400, or the close) ends this connection; otherwise wait for the next byte
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    if await reader.read(1024) == b"":
                        self.stats.closed_by_server += 1
                        return
                    self.stats.closed_by_server += 1  # the balancer answered (e.g. 408) and will close
                    return
