"""The upstream response parser: chunked bodies split anywhere decode to the same bytes; bad framing fails."""

from __future__ import annotations

import asyncio

import pytest

from lb.connection import Connection, UpstreamError
from lb.response import UpstreamResponse

EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(50)]
CHUNKED = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n"


def decode(wire: bytes, piece: int) -> tuple[bytes, bool]:
    """Feed `wire` in pieces of `piece` bytes, taking what is decodable after each; (body, complete)."""
    loop = asyncio.new_event_loop()  # Connection only keeps it for futures; nothing runs here
    conn = Connection(loop)
    response = UpstreamResponse(conn, timeout=1, reuse=lambda _: None)
    response._chunked = True
    response._remaining = -1
    body = b""
    try:
        for start in range(0, len(wire), piece):
            conn.buffer += wire[start : start + piece]
            body += response._take_chunked()
    finally:
        loop.close()
    return body, response.done and not conn.buffer


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, len(CHUNKED)])
def test_chunked_body_decodes_whatever_the_read_sizes(piece: int) -> None:
    assert decode(CHUNKED, piece) == (b"".join(EVENTS), True)


def test_chunk_extensions_and_trailers_are_skipped() -> None:
    wire = b"5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    assert decode(wire, 4) == (b"hello", True)


def test_incomplete_body_is_not_done() -> None:
    assert decode(CHUNKED[:-3], 16) == (b"".join(EVENTS), False)


def test_malformed_chunk_size_fails() -> None:
    with pytest.raises(UpstreamError):
        decode(b"zz\r\nhello\r\n", 100)
