"""A lean HTTP/1.1 client for the hot path: keep-alive connections to each worker, one request at a time each.

Why not aiohttp's ClientSession: profiling the proxy under wrk showed ~40% of the balancer's CPU inside the
client's request/response machinery (timers, tracing, cookie and URL handling, payload objects). Here a
request is one `transport.write` of bytes built from the incoming request, and the response head is parsed by
`find(b"\\r\\n\\r\\n")` + `split`; bodies are framed by Content-Length, chunked encoding or connection close.
aiohttp's session remains in use for health probes and the admin API, where speed does not matter.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import typing
from collections.abc import AsyncIterator

IDLE_TTL = 30.0  # seconds an idle keep-alive connection is reused; workers (aiohttp) close theirs after 75 s
MAX_BUFFER = 1 << 20  # bytes read ahead from a worker before we stop reading from its socket
NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamError(Exception):
    """The worker could not be reached or broke the connection. `sent` says whether it may have seen the
    whole request; `started` whether any response byte arrived."""

    def __init__(self, message: str, *, connect: bool = False, started: bool = False) -> None:
        super().__init__(message)
        self.connect = connect
        self.started = started


class UpstreamTimeout(UpstreamError):
    """Connect timeout (connect=True) or the worker stayed silent longer than the read timeout."""


class Connection(asyncio.Protocol):
    """One keep-alive TCP connection; the coroutine side parses what `data_received` buffers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._exc: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._got_data = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False

    # asyncio.Protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._got_data = True
        if len(self.buffer) > MAX_BUFFER and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._exc = exc or ConnectionResetError("connection closed by the worker")
        for waiter in (self._waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # coroutine side
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
        if self.closed:
            raise UpstreamError(f"worker closed the connection while receiving the request: {self._exc}")

    async def wait_data(self, timeout: float, started: bool) -> None:  # noqa: ASYNC109
        """Wait for more bytes; raise at EOF (UpstreamError) or after `timeout` s of silence."""
        if self.closed:
            raise UpstreamError(f"connection to the worker lost: {self._exc!r}", started=started)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._got_data = False
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self._got_data:
            return
        if self.closed:
            raise UpstreamError(f"connection to the worker lost: {self._exc!r}", started=started)
        raise UpstreamTimeout(f"the worker sent nothing for {timeout:g}s", started=started)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)  # wakes wait_data without new data: a read timeout


class UpstreamResponse:
    """Status and headers parsed; the body is read with `read()` or `chunks()`, then `release()`d."""

    __slots__ = (
        "_chunked",
        "_client",
        "_conn",
        "_key",
        "_remaining",
        "_timeout",
        "content_length",
        "content_type",
        "done",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, client: UpstreamClient, key: str, conn: Connection, timeout: float) -> None:
        self._client = client
        self._key = key
        self._conn = conn
        self._timeout = timeout
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.content_type = ""
        self.keep_alive = True
        self.done = False
        self._chunked = False
        self._remaining = 0  # bytes left in the body (Content-Length) or in the current chunk

    async def _read_head(self, method: str) -> None:
        conn = self._conn
        while True:
            end = conn.buffer.find(b"\r\n\r\n")
            while end < 0:
                await conn.wait_data(self._timeout, started=bool(conn.buffer))
                end = conn.buffer.find(b"\r\n\r\n")
            head = bytes(conn.buffer[:end])
            del conn.buffer[: end + 4]
            lines = head.decode("utf-8", "surrogateescape").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            try:
                status = int(rest[:3])
            except ValueError:
                raise UpstreamError(
                    f"malformed status line from the worker: {lines[0][:80]!r}", started=True
                ) from None
            if 100 <= status < 200:
                continue  # 100 Continue and friends: the real head follows
            break
        self.status = status
        self.keep_alive = version == "HTTP/1.1"
        headers = self.headers
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip()
            value = value.strip()
            lower = name.lower()
            if lower == "content-length":
                self.content_length = int(value)
            elif lower == "transfer-encoding":
                self._chunked = "chunked" in value.lower()
            elif lower == "connection":
                self.keep_alive = "close" not in value.lower() and (
                    self.keep_alive or "keep-alive" in value.lower()
                )
            elif lower == "content-type":
                self.content_type = value
            headers.append((name, value))
        if method == "HEAD" or status in NO_BODY_STATUSES:
            self.content_length = 0
            self._chunked = False
        if self._chunked:
            self.content_length = None
            self._remaining = -1  # before the first chunk-size line
        elif self.content_length is not None:
            self._remaining = self.content_length
        else:
            self.keep_alive = False  # body runs to connection close
        if self.content_length == 0:
            self._finish()

    async def read(self) -> bytes:
        """The whole body (for responses known to be small)."""
        buf = self._conn.buffer
        if not self._chunked and self._remaining and len(buf) == self._remaining:
            data = bytes(buf)  # the usual case: head and body arrived in one read
            buf.clear()
            self._remaining = 0
            self._finish()
            return data
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, without transfer-encoding framing; ends when the body is complete."""
        conn = self._conn
        while not self.done:
            data = self._take_chunked() if self._chunked else self._take_plain()
            if data:
                yield data
            elif not self.done:
                try:
                    await conn.wait_data(self._timeout, started=True)
                except UpstreamError:
                    if self.content_length is None and not self._chunked and conn.closed and not conn.buffer:
                        self._finish()  # close-delimited body: EOF is its end
                        return
                    raise

    def _take_plain(self) -> bytes:
        buf = self._conn.buffer
        if not buf:
            return b""
        if self.content_length is None:  # until close
            data = bytes(buf)
            buf.clear()
            return data
        n = min(len(buf), self._remaining)
        data = bytes(buf[:n])
        del buf[:n]
        self._remaining -= n
        if self._remaining == 0:
            self._finish()
        return data

    def _take_chunked(self) -> bytes:
        """Everything decodable from the buffer now: whole chunk payloads and the start of a partial one."""
        buf = self._conn.buffer
        out: list[bytes] = []
        while buf:
            if self._remaining > 0:  # inside a chunk's payload
                n = min(len(buf), self._remaining)
                out.append(bytes(buf[:n]))
                del buf[:n]
                self._remaining -= n
                if self._remaining == 0:
                    self._remaining = -2  # its trailing CRLF comes next
                continue
            if self._remaining == -2:
                if len(buf) < 2:
                    break
                del buf[:2]
                self._remaining = -1
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                break
            size_line = bytes(buf[:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise UpstreamError(
                    f"malformed chunk size from the worker: {size_line[:20]!r}", started=True
                ) from None
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", eol)
                if trailer_end < 0:
                    break  # wait for the (usually empty) trailer section
                del buf[: trailer_end + 4]
                self._finish()
                break
            del buf[: eol + 2]
            self._remaining = size
        return out[0] if len(out) == 1 else b"".join(out)

    def _finish(self) -> None:
        self.done = True

    def release(self) -> None:
        """Pool the connection if the body was read to its end, else close it (so the worker stops)."""
        conn = self._conn
        if self.done and self.keep_alive and not conn.closed and not conn.buffer:
            self._client.put_back(self._key, conn)
        else:
            conn.close()


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
            response = UpstreamResponse(self, key, conn, self.read_timeout)
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
    """The request line and headers as one bytes object; header names and values pass through undecoded."""
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8", "surrogateescape")]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if body is None:
        if method in ("POST", "PUT", "PATCH"):
            parts.append(b"Content-Length: 0\r\n")
    elif isinstance(body, bytes):
        parts.append(b"Content-Length: %d\r\n" % len(body))
    else:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
