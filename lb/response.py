"""UpstreamResponse: a worker's status line and headers, then its body framed by length, chunks or close."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from lb.connection import Connection, UpstreamError

NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamResponse:
    """Status and headers parsed; the body is read with `read()` or `chunks()`, then `release()`d."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_remaining",
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

    @property
    def buffered(self) -> bool:
        """Body bytes have already arrived (with the head, typically)."""
        return bool(self._conn.buffer)

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
        """Everything decodable from the buffer now: whole chunk payloads and the start of a partial one.

        One copy of the buffer and one deletion at the end: a read holding many SSE events (one chunk each)
        is parsed by offsets, not by shrinking the bytearray once per chunk (quadratic).
        """
        buf = self._conn.buffer
        data = bytes(buf)
        end = len(data)
        pos = 0
        remaining = self._remaining  # > 0: payload bytes left; -2: its CRLF next; -1: a size line next
        out: list[bytes] = []
        while pos < end:
            if remaining > 0:
                take = min(end - pos, remaining)
                out.append(data[pos : pos + take])
                pos += take
                remaining -= take
                if remaining == 0:
                    remaining = -2
                continue
            if remaining == -2:
                if end - pos < 2:
                    break
                pos += 2
                remaining = -1
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            size_line = data[pos:eol].split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise UpstreamError(
                    f"malformed chunk size from the worker: {size_line[:20]!r}", started=True
                ) from None
            if size == 0:
                trailer_end = data.find(b"\r\n\r\n", eol)
                if trailer_end < 0:
                    break  # wait for the (usually empty) trailer section
                pos = trailer_end + 4
                self._finish()
                break
            pos = eol + 2
            remaining = size
        del buf[:pos]
        self._remaining = remaining
        return out[0] if len(out) == 1 else b"".join(out)

    def _finish(self) -> None:
        self.done = True

    def release(self) -> None:
        """Pool the connection if the body was read to its end, else close it (so the worker stops)."""
        conn = self._conn
        if self.done and self.keep_alive and not conn.closed and not conn.buffer:
            self._reuse(conn)
        else:
            conn.close()
