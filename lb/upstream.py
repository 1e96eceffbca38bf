"""A lean HTTP/1.1 client for the hot path: keep-alive connections to each worker, one request at a time each.

Why not aiohttp's ClientSession: profiling the proxy under wrk showed ~40% of the balancer's CPU inside the
client's request/response machinery (timers, tracing, cookie and URL handling, payload objects). Here a
request is one `transport.write` of bytes built from the incoming request (already validated: an origin-form
target and the headers of lb/http11.py's `worker_headers`), and the response is parsed by llhttp
(lb/response.py); bodies are framed by Content-Length, chunked encoding or connection close.
aiohttp's session remains in use for health probes and the admin API, where speed does not matter.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import AsyncIterator

from lb.connection import Connection, UpstreamError, UpstreamTimeout
from lb.http11 import header_block
from lb.response import UpstreamResponse

IDLE_TTL = 30.0  # seconds an idle keep-alive connection is reused; workers (aiohttp) close theirs after 75 s


class UpstreamClient:
    """Keep-alive connection pools keyed by `host:port`, unbounded: the admission queue limits concurrency."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self._ssl = ssl.create_default_context()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[str, list[Connection]] = {}

    async def request(
        self,
        host: str,
        port: int,
        tls: bool,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request; return once the response head arrived. A reused connection that turns out to have
        been closed by the worker before any response byte is retried once on a fresh connection."""
        key = f"{'https' if tls else 'http'}://{host}:{port}"
        head = _request_head(method, target, f"{host}:{port}", headers, body)
        for attempt in (0, 1):
            conn = self._take_idle(key) if attempt == 0 else None
            if conn is None:
                conn = await self._connect(host, port, tls)
            response: UpstreamResponse | None = conn.response
            if response is None:
                response = UpstreamResponse(conn, self.read_timeout, functools.partial(self.put_back, key))
                conn.response = response
            else:
                response.reset()
            try:
                if body is None or isinstance(body, bytes):
                    conn.write(head + body if body else head)
                else:
                    conn.write(head)
                    async for piece in body:
                        conn.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                        await conn.drain()
                    conn.write(b"0\r\n\r\n")
                await response._read_head(method)
                return response
            except UpstreamError as exc:
                conn.close()
                if (
                    attempt == 0
                    and conn.reused
                    and not exc.started
                    and not isinstance(body, AsyncIterator)
                    and not isinstance(exc, UpstreamTimeout)
                ):
                    continue  # stale keep-alive connection: the classic race, not a dead worker
                raise
            except BaseException:
                conn.close()  # cancelled (client left) or a bug: never reuse a half-used connection
                raise
        raise AssertionError("unreachable")

    def _take_idle(self, key: str) -> Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_ok = time.monotonic() - IDLE_TTL
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since >= oldest_ok and not conn.buffer:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _connect(self, host: str, port: int, tls: bool) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop), host, port, ssl=self._ssl if tls else None
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connect to {host}:{port} timed out", connect=True) from None
        except OSError as exc:
            raise UpstreamError(
                f"connect to {host}:{port} failed: {exc.strerror or exc}", connect=True
            ) from None
        return conn

    def put_back(self, key: str, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)

    async def expire_idle(self) -> None:
        """Background task: close keep-alive connections idle for IDLE_TTL. Without it a burst's extra
        connections stay open (each a file descriptor here and a socket on the worker) until the worker
        closes them, since the pool hands out its most recently used connection first."""
        while True:
            await asyncio.sleep(IDLE_TTL / 2)
            oldest_ok = time.monotonic() - IDLE_TTL
            for idle in self._idle.values():
                expired = [conn for conn in idle if conn.idle_since < oldest_ok or conn.closed]
                for conn in expired:
                    idle.remove(conn)
                    conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _request_head(
    method: str,
    target: str,
    host: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes | AsyncIterator[bytes] | None,
) -> bytes:
    """The request line and headers as one bytes object; header names and values pass through undecoded,
    checked by `header_block`."""
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8", "surrogateescape")]
    parts.append(header_block(headers))
    if body is None:
        if method in ("POST", "PUT", "PATCH"):
            parts.append(b"Content-Length: 0\r\n")
    elif isinstance(body, bytes):
        parts.append(b"Content-Length: %d\r\n" % len(body))
    else:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


__all__ = ["UpstreamClient", "UpstreamError", "UpstreamResponse", "UpstreamTimeout"]
