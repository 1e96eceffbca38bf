"""Exchange: one client request and its response as the proxy sees them, whichever server carries them.

Two carriers: `AiohttpExchange` (any request aiohttp routed to the proxy) and `front.FrontExchange` (the
lean HTTP/1.1 front for the hot endpoints). The proxy reads `method`, `target` and `raw_headers` and answers
through `respond` (a complete body), or `start` + `write` + `end` (a stream), or `fail` (its own error).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict

from lb.errors import BalancerError, error_response

Reply = web.StreamResponse | None  # what an aiohttp handler returns; None when the front wrote it itself
# hop-by-hop (RFC 9110 7.6.1) or recomputed on our side of the connection
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "trailer"}
)
AIOHTTP_SETS = HOP_BY_HOP | {"date", "server"}  # aiohttp adds its own


class Exchange(Protocol):
    method: str
    target: str  # path and query, as received
    raw_headers: Sequence[tuple[bytes, bytes]]

    def respond(
        self, status: int, headers: list[tuple[str, str]], extra: list[tuple[str, str]], body: bytes
    ) -> Reply:
        """The whole response: the worker's headers (hop-by-hop ones are dropped here) plus `extra`."""
        ...

    async def start(self, status: int, headers: list[tuple[str, str]], extra: list[tuple[str, str]]) -> None:
        """Send the head of a streamed response (chunked)."""
        ...

    async def write(self, chunk: bytes) -> None:
        """One piece of a streamed body; raises ConnectionError when the client has left."""
        ...

    async def end(self) -> Reply: ...

    def fail(self, exc: BalancerError) -> Reply:
        """The balancer's own OpenAI-style error answer."""
        ...

    def gone(self) -> Reply:
        """The client left mid-stream: nothing more will be sent."""
        ...


class AiohttpExchange:
    __slots__ = ("_out", "method", "raw_headers", "request", "target")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.method = request.method
        self.target = request.raw_path
        self.raw_headers: Sequence[tuple[bytes, bytes]] = request.raw_headers
        self._out: web.StreamResponse | None = None

    def respond(
        self, status: int, headers: list[tuple[str, str]], extra: list[tuple[str, str]], body: bytes
    ) -> Reply:
        return web.Response(status=status, body=body, headers=_merge(headers, extra))

    async def start(self, status: int, headers: list[tuple[str, str]], extra: list[tuple[str, str]]) -> None:
        self._out = web.StreamResponse(status=status, headers=_merge(headers, extra))
        await self._out.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self._out is not None
        await self._out.write(chunk)

    async def end(self) -> Reply:
        assert self._out is not None
        await self._out.write_eof()
        return self._out

    def fail(self, exc: BalancerError) -> Reply:
        return error_response(exc)

    def gone(self) -> Reply:
        return self._out


def _merge(headers: list[tuple[str, str]], extra: list[tuple[str, str]]) -> CIMultiDict[str]:
    merged = CIMultiDict((k, v) for k, v in headers if k.lower() not in AIOHTTP_SETS)
    merged.extend(extra)
    return merged
