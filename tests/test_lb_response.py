"""The upstream response parser (llhttp): bodies split anywhere decode to the same bytes; bad framing fails
and the connection is never pooled again."""

from __future__ import annotations

import asyncio

import pytest

from lb.connection import Connection, UpstreamError, UpstreamTimeout
from lb.response import UpstreamResponse
from lb.upstream import UpstreamClient

EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(50)]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED = HEAD + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n"


def decode(wire: bytes, piece: int) -> tuple[bytes, bool, bool]:
    """Feed `wire` in pieces of `piece` bytes, taking what is parsed after each; (body, complete, pooled)."""
    loop = asyncio.new_event_loop()  # Connection only keeps it for futures; nothing runs here
    conn = Connection(loop)
    pooled: list[Connection] = []
    response = UpstreamResponse(conn, timeout=1, reuse=pooled.append)
    body = b""
    try:
        for start in range(0, len(wire), piece):
            conn.buffer += wire[start : start + piece]
            response._feed()
            body += b"".join(response._pieces)
            response._pieces.clear()
        response.release()
    finally:
        loop.close()
    return body, response.done, bool(pooled)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, len(CHUNKED)])
def test_chunked_body_decodes_whatever_the_read_sizes(piece: int) -> None:
    assert decode(CHUNKED, piece) == (b"".join(EVENTS), True, True)


def test_chunk_extensions_and_trailers_are_skipped() -> None:
    wire = HEAD + b"5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    assert decode(wire, 4) == (b"hello", True, True)


def test_incomplete_body_is_not_done_and_not_pooled() -> None:
    assert decode(CHUNKED[:-3], 16) == (b"".join(EVENTS), False, False)


def test_bytes_after_the_end_of_a_response_keep_its_connection_out_of_the_pool() -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert decode(wire, len(wire)) == (b"ok", True, False)


@pytest.mark.parametrize(
    "wire",
    [
        HEAD + b"zz\r\nhello\r\n",  # not hex
        HEAD + b"0x5\r\nhello\r\n0\r\n\r\n",
        HEAD + b"+5\r\nhello\r\n0\r\n\r\n",
        HEAD + b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the chunk data
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: b\nContent-Length: 5\r\n\r\nhello",  # bare LF
        b"HTTP/1.1 200 OK\r\nX-A: b\x00c\r\nContent-Length: 5\r\n\r\nhello",  # NUL
        b"HTTP/1.1 2000 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 099 Odd\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
)
def test_bad_framing_fails_and_is_never_pooled(wire: bytes) -> None:
    loop = asyncio.new_event_loop()
    conn = Connection(loop)
    pooled: list[Connection] = []
    response = UpstreamResponse(conn, timeout=1, reuse=pooled.append)
    try:
        with pytest.raises(UpstreamError):
            conn.buffer += wire
            response._feed()
            assert response._head_done
            response._pieces.clear()
            assert response.done  # a body cut short is an error too, once the worker closes
        response.release()
    finally:
        loop.close()
    assert not pooled


async def test_the_read_timeout_counts_from_each_wait_on_a_reused_connection() -> None:
    """One keep-alive connection, four requests: answered at once, after 0.3 s twice (the second outlives
    the deadline of the first wait: it must not time out), then never (it times out 0.5 s after it began)."""
    delays: list[float | None] = [0.0, 0.3, 0.3, None]
    connections: list[asyncio.StreamWriter] = []

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.readuntil(b"\r\n\r\n"):
            delay = delays.pop(0)
            if delay is None:
                continue  # silent: the balancer must give up on its own
            await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await asyncio.start_server(worker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = UpstreamClient(connect_timeout=1, read_timeout=0.5)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(3):
            response = await client.request("127.0.0.1", port, False, "GET", "/", [], None)
            assert await response.read() == b"ok"
            response.release()  # pooled: the next request reuses the connection and its timer
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await client.request("127.0.0.1", port, False, "GET", "/", [], None)
        assert 0.45 <= loop.time() - started < 1.5
        assert len(connections) == 1
    finally:
        client.close()
        server.close()
