"""Exchange: one client request and its response as the proxy sees them, whichever server carries them.

Two carriers: `AiohttpExchange` (any request aiohttp routed to the proxy) and `FrontExchange` (requests the
lean HTTP/1.1 front of lb/front.py serves itself). The proxy reads `method`, `target` and `raw_headers`
and answers through `respond` (a whole body), `start` + `write` + `end` (a stream) or `fail` (its error).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict

from lb.errors import BalancerError, error_body, error_headers, error_response
from lb.http11 import HOP_BY_HOP as RAW_HOP_BY_HOP
from lb.http11 import connection_named, end_to_end, header_block, origin_form

Reply = web.StreamResponse | None  # what an aiohttp handler returns; None when the front wrote it itself
# hop-by-hop (RFC 9110 7.6.1) or recomputed on our side of the connection
HOP_BY_HOP = frozenset(name.decode() for name in RAW_HOP_BY_HOP)
AIOHTTP_SETS = HOP_BY_HOP | {"date", "server"}  # aiohttp adds its own
log = logging.getLogger("lb.exchange")
CLOSE_AFTER = frozenset({400, 408, 413, 431})  # refusals after which nothing more is read from the client


class Exchange(Protocol):
    method: str
    target: str  # path and query, as received
    raw_headers: Sequence[tuple[bytes, bytes]]

    def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], extra: list[tuple[str, str]], body: bytes
    ) -> Reply:
        """The whole response: the worker's headers as received (hop-by-hop ones are dropped here) plus
        the balancer's `extra`."""
        ...

    async def start(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        extra: list[tuple[str, str]],
        more_now: bool = False,
    ) -> None:
        """Send the head of a streamed response (chunked); with `more_now` (body bytes already here) the
        front may send it together with the first piece."""
        ...

    async def write(self, chunk: bytes) -> None:
        """One piece of a streamed body; raises ConnectionError when the client has left."""
        ...

    async def end(self, last: bytes = b"") -> Reply:
        """Finish the stream, with `last` as its final piece (one write instead of two on the front)."""
        ...

    def fail(self, exc: BalancerError) -> Reply:
        """The balancer's own OpenAI-style error answer."""
        ...

    def gone(self) -> Reply:
        """The client left mid-stream: nothing more will be sent."""
        ...

    def abort(self) -> Reply:
        """Cut the client's connection: a body already under way cannot be finished."""
        ...


class ClientSocket(Protocol):
    """The client connection a FrontExchange writes to (lb/front.py's FrontProtocol)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...


class AiohttpExchange:
    __slots__ = ("_out", "method", "raw_headers", "request", "target")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.method = request.method
        target = origin_form(request.raw_path.encode("utf-8", "surrogateescape"))
        self.target = target.decode("ascii") if target is not None else ""  # "": the proxy refuses it
        self.raw_headers: Sequence[tuple[bytes, bytes]] = request.raw_headers
        self._out: web.StreamResponse | None = None

    def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], extra: list[tuple[str, str]], body: bytes
    ) -> Reply:
        return web.Response(status=status, body=body, headers=_merge(headers, extra))

    async def start(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        extra: list[tuple[str, str]],
        more_now: bool = False,
    ) -> None:
        self._out = web.StreamResponse(status=status, headers=_merge(headers, extra))
        await self._out.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self._out is not None
        await self._out.write(chunk)

    async def end(self, last: bytes = b"") -> Reply:
        assert self._out is not None
        await self._out.write_eof(last)
        return self._out

    def fail(self, exc: BalancerError) -> Reply:
        response = error_response(exc)
        if exc.status in CLOSE_AFTER:
            response.force_close()  # its body may be unread, or its bytes untrustworthy
        return response

    def gone(self) -> Reply:
        return self._out

    def abort(self) -> Reply:
        if self.request.transport is not None:
            self.request.transport.abort()
        return self._out


def _merge(headers: list[tuple[bytes, bytes]], extra: list[tuple[str, str]]) -> CIMultiDict[str]:
    named = connection_named(headers)
    drop = AIOHTTP_SETS | {name.decode("latin-1") for name in named}
    merged = CIMultiDict(
        (k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
        for k, v in headers
        if k.decode("latin-1").lower() not in drop
    )
    merged.extend(extra)
    return merged


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class FrontExchange:
    """Writes the proxy's answer to the client socket: one write for whole responses, chunked for streams."""

    __slots__ = ("_front", "_pending", "keep_alive", "method", "raw_headers", "target")

    def __init__(
        self,
        front: ClientSocket,
        method: str,
        target: str,
        raw_headers: Sequence[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        self._front = front
        self._pending = b""  # a stream's head, held back to share one write with the first piece
        self.method = method
        self.target = target
        self.raw_headers = raw_headers
        self.keep_alive = keep_alive

    def _head(
        self, status: int, headers: list[tuple[bytes, bytes]], extra: list[tuple[str, str]], framing: bytes
    ) -> list[bytes]:
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode())]
        # checked: no byte of an invalid header reaches the client
        parts.append(header_block(end_to_end(headers, RAW_HOP_BY_HOP)))
        for name, value in extra:
            parts.append(f"{name}: {value}\r\n".encode())
        if not self.keep_alive:
            parts.append(b"Connection: close\r\n")
        parts.append(framing)
        return parts

    def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], extra: list[tuple[str, str]], body: bytes
    ) -> Reply:
        parts = self._head(status, headers, extra, b"Content-Length: %d\r\n\r\n" % len(body))
        parts.append(body)
        self._front.write(b"".join(parts))
        return None

    async def start(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        extra: list[tuple[str, str]],
        more_now: bool = False,
    ) -> None:
        head = b"".join(self._head(status, headers, extra, b"Transfer-Encoding: chunked\r\n\r\n"))
        if more_now:
            self._pending = head  # goes out with the first piece, which is already buffered
        else:
            self._front.write(head)  # the client sees the headers while the worker is still thinking

    async def write(self, chunk: bytes) -> None:
        if chunk:
            self._front.write(self._take_pending() + b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await self._front.drain()

    async def end(self, last: bytes = b"") -> Reply:
        tail = b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last else b"0\r\n\r\n"
        self._front.write(self._take_pending() + tail)
        return None

    def _take_pending(self) -> bytes:
        pending, self._pending = self._pending, b""
        return pending

    def fail(self, exc: BalancerError) -> Reply:
        body = error_body(exc.message, exc.type, exc.code, exc.param)
        extra = [("Content-Type", "application/json"), *error_headers(exc)]
        return self.respond(exc.status, [], extra, body)

    def gone(self) -> Reply:
        return None

    def abort(self) -> Reply:
        self._front.abort()
        return None
