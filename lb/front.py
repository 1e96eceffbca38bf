"""The front: owns the listening socket, serves the hot endpoints itself, hands other connections to aiohttp.

Why: under wrk, aiohttp's server machinery (request objects, routing, a task and a response object per
request) cost about as much CPU as everything else the balancer does. This protocol finds the end of a
request head, has llhttp judge it (lb/request_head.py), and when it is a plain `/v1/chat/completions`-style
HTTP/1.1 request with a Content-Length body, receives the whole body and runs `Proxy.forward` over a
`FrontExchange` that writes the response bytes straight to the socket. Any other valid request (admin,
/stats, chunked uploads, HTTP/1.0, everything with --no-fast-front) is handed over with the bytes read so
far: the transport switches to aiohttp's protocol for good, as if aiohttp had accepted the connection.

Every connection is bounded before it is handed over or served: one deadline for a head (--header-timeout)
and one for a body (--body-timeout), apart from the keep-alive idle timeout; head and header-line sizes; the
body size; the number of open connections. Whatever it refuses gets an OpenAI-style JSON answer and the
connection is closed, so nothing after a bad byte is ever read as another request.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

from lb.config import BalancerConfig
from lb.connection import UpstreamError
from lb.errors import (
    BalancerError,
    BodyTooLarge,
    RequestHeaderTooLarge,
    RequestTimeout,
    TooManyConnections,
    error_bytes,
)
from lb.exchange import FrontExchange
from lb.proxy import HOT_PATHS, Proxy
from lb.request_head import RequestHead, RequestReader

FRONT_PATHS = frozenset(path.encode() for path in HOT_PATHS)
log = logging.getLogger("lb.front")
INF = float("inf")
LINGER_S = 2.0  # seconds a refused connection is still read (and dropped) before it is closed


@dataclass(frozen=True)
class FrontLimits:
    """What one client connection may hold and for how long (seconds, bytes)."""

    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    max_head: int
    max_line: int
    max_body: int
    max_connections: int

    @classmethod
    def of(cls, config: BalancerConfig) -> FrontLimits:
        return cls(
            config.header_timeout,
            config.body_timeout,
            config.keepalive_timeout,
            config.max_header_size,
            config.max_header_line,
            config.max_body_size,
            config.max_connections,
        )


class AiohttpHandover(typing.Protocol):
    """Makes aiohttp's protocol for a handed-over connection and counts those aiohttp holds."""

    def __call__(self) -> asyncio.Protocol: ...

    def __len__(self) -> int: ...


class FrontProtocol(asyncio.Protocol):
    """One client connection; requests on it are served one after another (pipelined ones wait in turn)."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._proxy = front.proxy
        self._limits = front.limits
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no head end
        self._reader = RequestReader(self._limits.max_line)
        self._head: RequestHead | None = None  # parsed, its body still arriving
        self._head_size = 0
        self.task: asyncio.Task[None] | None = None
        self._closing = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # one lazy timer per connection: the current deadline moves freely (an attribute), the timer is
        # re-armed only when it would fire too late, so a busy keep-alive connection arms about one per
        # keep-alive period instead of two per request
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = INF
        self._on_deadline: Callable[[], None] = self.close_if_idle
        self._waiting_for_head = False  # the header deadline runs from a head's first byte
        self._handed_over = False  # aiohttp owns it, or it was refused: the front reads no more of it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        if self._front.open_connections() >= self._limits.max_connections:
            log.warning(
                "refusing a connection: %d are open (--max-connections)", self._limits.max_connections
            )
            self._handed_over = True  # nothing more is read from it
            self.transport.write(
                error_bytes(TooManyConnections("Too many open connections; retry shortly."), close=True)
            )
            self.transport.close()
            return
        self._front.connections.add(self)
        self._set_deadline(self._limits.keepalive_timeout, self.close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._front.connections.discard(self)
        self._disarm()
        if self.task is not None:
            self.task.cancel()  # the client left: the proxy closes its upstream request, the worker stops
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client disconnected"))

    def data_received(self, data: bytes) -> None:
        if self._handed_over:
            return  # refused: whatever follows a refusal is never read as a request
        self._buffer += data
        if self.task is not None:
            if len(self._buffer) > self._limits.max_head + self._limits.max_body:
                # More pipelined bytes than one whole request may hold, sent while one is running: a client
                # that floods the connection is cut off rather than buffered without bound. (Pausing reading
                # instead would also hide the client's disconnect, which must cancel the running request.)
                log.warning("closing a connection that sent %d bytes ahead of its request", len(self._buffer))
                self.abort()
            return
        self._next_request()

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
        limits = self._limits
        head = self._head
        if head is None:
            if not buf:
                return
            end = buf.find(b"\r\n\r\n", self._scanned)
            if end < 0:
                if not self._waiting_for_head:  # the deadline runs from the head's first byte
                    self._waiting_for_head = True
                    self._set_deadline(limits.header_timeout, self._head_timed_out)
                self._scanned = max(0, len(buf) - 3)
                if len(buf) > limits.max_head:
                    return self._refuse(
                        RequestHeaderTooLarge(f"The request head exceeds {limits.max_head} bytes.")
                    )
                if len(buf) > limits.max_line and buf.find(b"\r\n", 0, limits.max_line) < 0:
                    return self._refuse(
                        RequestHeaderTooLarge(f"The request line exceeds {limits.max_line} bytes.")
                    )
                return
            self._scanned = 0
            size = end + 4
            if size > limits.max_head:
                return self._refuse(
                    RequestHeaderTooLarge(f"The request head exceeds {limits.max_head} bytes.")
                )
            try:
                head = self._reader.read_head(bytes(buf[:size]))
            except BalancerError as exc:
                return self._refuse(exc)
            if (
                head.version != "1.1"
                or head.hand_over
                or head.target.split(b"?", 1)[0] not in self._front.paths
            ):
                return self._hand_over()
            if head.content_length > limits.max_body:
                return self._refuse(
                    BodyTooLarge(
                        f"Request body of {head.content_length} bytes exceeds the limit of "
                        f"{limits.max_body} bytes."
                    )
                )
            self._head, self._head_size = head, size
            self._waiting_for_head = False
            if len(buf) < size + head.content_length:  # the body is still arriving: its own deadline
                self._set_deadline(limits.body_timeout, self._body_timed_out)
            else:
                self._deadline = INF
        end = self._head_size + head.content_length
        if len(buf) < end:
            return
        body = None
        if head.content_length:
            body = bytes(buf[self._head_size : end])
            self._reader.read_body(body)  # the parser ends the message and is ready for the next head
        del buf[:end]
        self._head = None
        self._deadline = INF  # running: no deadline on the client's side
        exchange = FrontExchange(
            self,
            head.method,
            head.target.decode("ascii"),
            head.headers,
            head.keep_alive and not self._closing,
        )
        self.task = self._loop.create_task(self._serve(exchange, body, head.authorization, head.api_key))

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
            self.abort()
            return
        except UpstreamError as exc:  # the worker broke a response already under way: cut the client off
            log.warning("worker failed mid-response to %s %s: %s", exchange.method, exchange.target, exc)
            self.abort()
            return
        except Exception:  # a bug: log it, and never leave the client hanging on a half-sent answer
            log.exception("request failed in the front: %s %s", exchange.method, exchange.target)
            self.abort()
            return
        self.task = None
        if not exchange.keep_alive or self._closing:
            if self.transport is not None:
                self.transport.close()
        elif self._buffer:
            self._next_request()
        else:
            self._set_deadline(self._limits.keepalive_timeout, self.close_if_idle)

    def _head_timed_out(self) -> None:
        self._refuse(RequestTimeout(f"No complete request head within {self._limits.header_timeout:g}s."))

    def _body_timed_out(self) -> None:
        self._refuse(
            RequestTimeout(f"The request body did not arrive within {self._limits.body_timeout:g}s.")
        )

    def _refuse(self, exc: BalancerError) -> None:
        """Answer the balancer's own error and close: the bytes after a bad head are never read as a request.

        A lingering close, as nginx does: our side is shut for writing, what the client still sends is read
        and dropped for up to LINGER_S, so the answer is not lost to a reset from unread bytes."""
        log.info("refused a request (%d): %s", exc.status, exc.message)
        self._handed_over = True
        self._buffer.clear()
        self._proxy.rejected(exc)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(error_bytes(exc, close=True))
        if transport.can_write_eof():
            transport.write_eof()
            self._disarm()
            self._timer = self._loop.call_later(LINGER_S, transport.close)
        else:
            self._disarm()
            transport.close()

    def _set_deadline(self, delay: float, callback: Callable[[], None]) -> None:
        """`callback` in `delay` s unless the phase changes first."""
        at = self._loop.time() + delay
        self._deadline, self._on_deadline = at, callback
        if self._timer is None or self._timer_at > at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self._loop.call_at(at, self._expire), at

    def _expire(self) -> None:
        self._timer = None
        if self._deadline == INF:
            return
        if self._loop.time() < self._deadline:  # the deadline moved on since the timer was armed
            self._timer, self._timer_at = self._loop.call_at(self._deadline, self._expire), self._deadline
            return
        self._deadline = INF
        self._on_deadline()

    def _disarm(self) -> None:
        self._deadline = INF
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        """Cut the connection (no graceful close): nothing more is read or written on it."""
        self._closing = True
        self._handed_over = True
        self._buffer.clear()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.task = None
        if self.transport is not None:
            self.transport.abort()

    def _hand_over(self) -> None:
        """From here on aiohttp owns this connection, starting with the bytes already read."""
        assert self.transport is not None
        self._handed_over = True
        self._front.connections.discard(self)
        self._disarm()  # aiohttp keeps its own keep-alive timer
        protocol = self._front.aiohttp()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            protocol.data_received(data)


class Front:
    """The listening socket and the connections it serves; `paths` empty hands every connection over."""

    def __init__(self, proxy: Proxy, aiohttp: AiohttpHandover, config: BalancerConfig) -> None:
        self.proxy = proxy
        self.aiohttp = aiohttp
        self.limits = FrontLimits.of(config)
        self.paths = FRONT_PATHS if config.fast_front else frozenset()
        self.connections: set[FrontProtocol] = set()
        self._server: asyncio.Server | None = None

    def open_connections(self) -> int:
        return len(self.connections) + len(self.aiohttp)

    async def start(self, host: str, port: int) -> None:
        _raise_file_limit(
            2 * self.limits.max_connections + 256
        )  # a client and a worker socket each, and spare
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrontProtocol(self), host, port, backlog=2048, reuse_address=True
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


def _raise_file_limit(wanted: int) -> None:
    """Lift the soft open-files limit towards `wanted` (up to the hard limit): with the common default of
    1024, accept() would fail long before --max-connections refuses anyone cleanly."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning(
            "open-files limit %d is below the %d that --max-connections %d needs",
            target,
            wanted,
            (wanted - 256) // 2,
        )
