"""UpstreamResponse: a worker's response parsed by llhttp (httptools): status, headers, then the body framed
by Content-Length, chunked encoding or connection close.

llhttp refuses what a strict parser refuses (a negative, non-decimal or repeated Content-Length, chunk sizes
such as `0x5` or `+5`, a missing CRLF after chunk data, bare CR / LF, control bytes in headers); the checks
here add a bound on the head's size, a valid status code and bytes sent after the response's end. Any of
these is an UpstreamError: a 502 before the client saw a byte, a cut stream after, and in every case the
connection is closed rather than pooled again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httptools

from lb.connection import Connection, UpstreamError

MAX_HEAD = 64 * 1024  # bytes of status line and headers a worker may send


class _Overrun(Exception):
    """The worker sent bytes after the end of its response."""


class _HeadOnly(Exception):
    """A HEAD response: its headers are all there is, whatever Content-Length says."""


class UpstreamResponse:
    """Status and headers parsed; the body is read with `read()` or `chunks()`, then `release()`d."""

    __slots__ = (
        "_clean",
        "_close_delimited",
        "_conn",
        "_head_done",
        "_head_fed",
        "_head_only",
        "_interim",
        "_parser",
        "_pieces",
        "_reuse",
        "_timeout",
        "content_length",
        "content_type",
        "done",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, conn: Connection, timeout: float, reuse: Callable[[Connection], None]) -> None:
        self._reuse = reuse  # takes the connection back into its pool once the body was read to its end
        self._conn = conn
        self._timeout = timeout
        # one parser per connection (llhttp starts over after each complete response): making one binds
        # every callback, which costs more than parsing a small response
        self._parser = httptools.HttpResponseParser(self)
        self.reset()

    def reset(self) -> None:
        """Ready for the next response on the same keep-alive connection (only after a clean `release`)."""
        self._pieces: list[bytes] = []  # body bytes parsed and not yet taken
        self._head_done = False
        self._head_fed = 0  # bytes fed before the head was complete (a head may trickle in)
        self._head_only = False
        self._interim = False  # inside a 1xx response, whose real one follows
        self._close_delimited = False
        self._clean = True  # nothing after the response's end, no parser error
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # as received: the front writes them back undecoded
        self.content_length: int | None = None
        self.content_type = ""
        self.keep_alive = True
        self.done = False

    # llhttp callbacks
    def on_message_begin(self) -> None:
        if self.done:
            raise _Overrun

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers = self.headers
        if self._head_fed > MAX_HEAD and sum(len(k) + len(v) + 4 for k, v in headers) > MAX_HEAD:
            raise UpstreamError(f"the worker's response head exceeds {MAX_HEAD} bytes", started=True)
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue and friends: the real head follows
            headers.clear()
            return
        if not 200 <= status <= 599:
            raise UpstreamError(f"the worker answered an invalid status {status}", started=True)
        chunked = False
        for name, value in headers:  # the names' lengths first: lower() only for likely candidates
            size = len(name)
            if size == 14 and name.lower() == b"content-length":
                self.content_length = int(value)  # llhttp accepted it: one value, decimal digits, no overflow
            elif size == 12 and name.lower() == b"content-type":
                self.content_type = value.decode("latin-1")
            elif size == 17 and name.lower() == b"transfer-encoding":
                chunked = True
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        self._head_done = True
        if self._head_only or status in (204, 304):
            self.content_length = 0
            self.done = True
            if self._head_only:
                raise _HeadOnly  # llhttp would wait for the Content-Length it announced
        elif self.content_length is None and not chunked:
            self._close_delimited = True
            self.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.done = True

    # the coroutine side
    def _feed(self) -> None:
        """Parse everything buffered on the connection."""
        buf = self._conn.buffer
        data = bytes(buf)
        buf.clear()
        if not self._head_done:
            self._head_fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # whatever follows the error is not ours: the connection is never reused
            self._clean = False
            cause = exc.__context__
            if isinstance(cause, UpstreamError):
                raise cause from None
            if self.done:
                return  # bytes after the response's end (_Overrun, or after `Connection: close`): it is whole
            raise UpstreamError(f"malformed response from the worker: {exc}", started=True) from None
        if not self._head_done and self._head_fed > MAX_HEAD:
            self._clean = False
            raise UpstreamError(f"the worker's response head exceeds {MAX_HEAD} bytes", started=True)

    async def _read_head(self, method: str) -> None:
        self._head_only = method == "HEAD"
        conn = self._conn
        while True:
            if conn.buffer:
                self._feed()
                if self._head_done:
                    return
            await conn.wait_data(self._timeout, started=self._started)

    @property
    def _started(self) -> bool:
        return self._head_fed > 0

    @property
    def buffered(self) -> bool:
        """Body bytes have already arrived (with the head, typically)."""
        return bool(self._pieces) or bool(self._conn.buffer)

    async def read(self) -> bytes:
        """The whole body (for responses known to be small)."""
        if self._conn.buffer:
            self._feed()
        if self.done:  # the usual case: head and body arrived in one read
            pieces, self._pieces = self._pieces, []
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, without transfer-encoding framing; ends when the body is complete.

        `done` is already true when the last piece is yielded, so it can go out with the end of the stream.
        """
        conn = self._conn
        while True:
            if conn.buffer:
                self._feed()
            if self._pieces:
                pieces = self._pieces
                self._pieces = []
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                continue
            if self.done:
                return
            try:
                await conn.wait_data(self._timeout, started=True)
            except UpstreamError:
                if self._close_delimited and conn.closed and not conn.buffer:
                    self.done = True  # a close-delimited body: EOF is its end
                    return
                raise

    def release(self) -> None:
        """Pool the connection if the body was read to its end and nothing followed it, else close it (so
        the worker stops, and nothing left on it is ever read as the next request's answer)."""
        conn = self._conn
        if self.done and self._clean and self.keep_alive and not conn.closed and not conn.buffer:
            self._reuse(conn)
        else:
            conn.close()
