"""The lean HTTP/1.1 front: serves the hot endpoints itself and hands every other connection to aiohttp.

Why: under wrk, aiohttp's server machinery (request objects, routing, a task and a response object per
request) cost about as much CPU as everything else the balancer does. This protocol parses a request head with
`find` + `split`, and when it is a plain `/v1/chat/completions`-style POST (HTTP/1.1, Content-Length up to
1 MiB, no Expect/Upgrade/chunked body) runs the same `Proxy.forward` over a `FrontExchange` that writes the
response bytes straight to the socket. Anything else (admin, /stats, /metrics, odd requests, malformed
heads) is handed over with the bytes read so far: the transport switches to aiohttp's protocol for good, so
aiohttp answers it exactly as if it had accepted the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from collections.abc import Callable

from lb.errors import BalancerError
from lb.exchange import FrontExchange
from lb.proxy import HOT_PATHS, Proxy
from lb.request_body import BUFFER_LIMIT

FRONT_PATHS = frozenset(path.encode() for path in HOT_PATHS)
log = logging.getLogger("lb.front")
KEEPALIVE_TIMEOUT = 75.0  # seconds an idle client connection stays open, as aiohttp's server does
MAX_HEAD = 64 * 1024  # bytes: longer heads go to aiohttp, which answers 431/400


class FrontProtocol(asyncio.Protocol):
    """One client connection; requests on it are served one after another (pipelined ones wait in turn)."""

    def __init__(
        self,
        proxy: Proxy,
        aiohttp_factory: Callable[[], asyncio.Protocol],
        max_body: int,
        connections: set[FrontProtocol],
    ) -> None:
        self._proxy = proxy
        self._aiohttp_factory = aiohttp_factory
        self._max_body = min(max_body, BUFFER_LIMIT)
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self._closing = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self._connections.add(self)
        self._idle_timer = self._loop.call_later(KEEPALIVE_TIMEOUT, self.close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.task is not None:
            self.task.cancel()  # the client left: the proxy closes its upstream request, the worker stops
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client disconnected"))

    def data_received(self, data: bytes) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._buffer += data
        if self.task is not None and len(self._buffer) > MAX_HEAD + self._max_body:
            # More pipelined bytes than one whole request may hold, sent while one is running: a client that
            # floods the connection is cut off rather than buffered without bound. (Pausing reading instead
            # would also hide the client's disconnect, which must cancel the running request.)
            log.warning("closing a connection that sent %d bytes ahead of its request", len(self._buffer))
            self._abort()
            return
        if self.task is None:
            self._next_request()
            if self.task is None and not self._handed_over:  # a head or body still arriving: not forever
                self._idle_timer = self._loop.call_later(KEEPALIVE_TIMEOUT, self.close_if_idle)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("client disconnected")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused:
            self._drain = self._loop.create_future()
            await self._drain

    def close_if_idle(self) -> None:
        """Shutdown or keep-alive timeout: close the connection if no request is running on it."""
        self._closing = True
        if self.task is None and self.transport is not None:
            self.transport.close()

    def _next_request(self) -> None:
        buf = self._buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._hand_over()
            return
        lines = bytes(buf[:end]).split(b"\r\n")
        request_line = lines[0].split(b" ")
        if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
            return self._hand_over()
        method, target, _ = request_line
        if target.split(b"?", 1)[0] not in FRONT_PATHS:
            return self._hand_over()
        headers: list[tuple[bytes, bytes]] = []
        length = 0
        lengths = 0
        keep_alive = True
        authorization: bytes | None = None
        api_key: bytes | None = None
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():  # obs-fold or space before ':': let aiohttp judge
                return self._hand_over()
            value = value.strip()
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit():
                    return self._hand_over()
                length = int(value)
                lengths += 1
            elif lower in (b"transfer-encoding", b"expect", b"upgrade"):
                return self._hand_over()
            elif lower == b"connection":
                keep_alive = b"close" not in value.lower()
            elif lower == b"authorization":
                authorization = value
            elif lower == b"x-api-key":
                api_key = value
            headers.append((name, value))
        if lengths > 1 or length > self._max_body:
            return self._hand_over()  # aiohttp answers 400 / 413
        if len(buf) < end + 4 + length:
            return  # the body is still arriving
        body = bytes(buf[end + 4 : end + 4 + length]) if length else None
        del buf[: end + 4 + length]
        exchange = FrontExchange(
            self,
            method.decode(),
            target.decode("utf-8", "surrogateescape"),
            headers,
            keep_alive and not self._closing,
        )
        self.task = self._loop.create_task(self._serve(exchange, body, authorization, api_key))

    async def _serve(
        self,
        exchange: FrontExchange,
        body: bytes | None,
        authorization: bytes | None,
        api_key: bytes | None,
    ) -> None:
        started = time.perf_counter()
        try:
            try:
                self._proxy.check_key(
                    authorization.decode("latin-1") if authorization is not None else None,
                    api_key.decode("latin-1") if api_key is not None else None,
                )
            except BalancerError as exc:
                self._proxy.refuse(exchange, exc)
            else:
                await self._proxy.forward(exchange, body, started)
        except (ConnectionError, asyncio.CancelledError):
            self._abort()
            return
        except Exception:  # a bug: log it, and never leave the client hanging on a half-sent answer
            log.exception("request failed in the front: %s %s", exchange.method, exchange.target)
            self._abort()
            return
        self.task = None
        if not exchange.keep_alive or self._closing:
            if self.transport is not None:
                self.transport.close()
        elif self._buffer:
            self._next_request()
        else:
            self._idle_timer = self._loop.call_later(KEEPALIVE_TIMEOUT, self.close_if_idle)

    def _abort(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.task = None
        if self.transport is not None:
            self.transport.abort()

    def _hand_over(self) -> None:
        """From here on aiohttp owns this connection, starting with the bytes already read."""
        assert self.transport is not None
        self._handed_over = True
        self._connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()  # aiohttp keeps its own keep-alive timer
        protocol = self._aiohttp_factory()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            protocol.data_received(data)


class Front:
    """The listening socket of the lean front and the connections it serves."""

    def __init__(self, proxy: Proxy, aiohttp_factory: Callable[[], asyncio.Protocol], max_body: int) -> None:
        self._proxy = proxy
        self._aiohttp_factory = aiohttp_factory
        self._max_body = max_body
        self.connections: set[FrontProtocol] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrontProtocol(self._proxy, self._aiohttp_factory, self._max_body, self.connections),
            host,
            port,
            backlog=2048,
            reuse_address=True,
        )

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - the drain deadline
        """Stop accepting, close idle connections, let running requests end in `timeout` s, cancel others."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close_if_idle()
        deadline = time.monotonic() + timeout
        while any(c.task is not None for c in self.connections) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # polling a handful of connections while draining
        for connection in list(self.connections):
            if connection.task is not None:
                connection.task.cancel()
            if connection.transport is not None:
                connection.transport.close()
