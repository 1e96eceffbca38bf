"""The lean HTTP/1.1 front over raw sockets: keep-alive, pipelining, hand-over to aiohttp, close."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.lb_upstream import both_loops

event_loop_policy = pytest.fixture(scope="module", params=["asyncio", "uvloop"])(both_loops)
BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()


def post(path: str = "/v1/chat/completions", extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n%b"
        % (path.encode(), len(BODY), extra, BODY)
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_pipelined_requests_are_answered_in_order(upstreams: Any, balancer: Any) -> None:
    url = await balancer([await upstreams()])
    reader, writer = await connect(url)
    writer.write(post() + post("/v1/completions") + post())  # three requests before reading any answer
    for _ in range(3):
        status, headers, body = await asyncio.wait_for(read_response(reader), 5)
        assert status == 200 and headers["x-lb-worker"] == "0" and json.loads(body)["model"] == "tiny"
    writer.close()


async def test_other_paths_on_a_kept_alive_connection_go_to_aiohttp(upstreams: Any, balancer: Any) -> None:
    url = await balancer([await upstreams()])
    reader, writer = await connect(url)
    writer.write(post())
    assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
    writer.write(b"GET /stats HTTP/1.1\r\nHost: lb\r\n\r\n")  # same connection, now handed to aiohttp
    status, headers, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and json.loads(body)["total_requests"] == 1
    writer.write(post())  # aiohttp owns the connection for good and still proxies
    status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and headers["x-lb-worker"] == "0"
    writer.close()


async def test_connection_close_is_honoured(upstreams: Any, balancer: Any) -> None:
    url = await balancer([await upstreams()])
    reader, writer = await connect(url)
    writer.write(post(extra=b"Connection: close\r\n"))
    status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the front closed its side
    writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",  # HTTP/1.0
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length : 2\r\n\r\n{}",
        b"GARBAGE\r\n\r\n",
    ],
)
async def test_unusual_requests_are_left_to_aiohttp(
    upstreams: Any, balancer: Any, request_bytes: bytes
) -> None:
    url = await balancer([await upstreams()])
    reader, writer = await connect(url)
    writer.write(request_bytes)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    assert head.startswith(b"HTTP/1.")  # answered (400, or proxied for HTTP/1.0), never hung or crashed
    writer.close()


async def test_a_client_flooding_a_busy_connection_is_cut_off(upstreams: Any, balancer: Any) -> None:
    upstream = await upstreams()
    url = await balancer([upstream], max_body_size=4096)
    reader, writer = await connect(url)
    held = json.dumps({"model": "tiny", "stream": True, "hold": True}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nContent-Length: %d\r\n\r\n%b" % (len(held), held)
    )
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    try:
        for _ in range(64):  # 4 MiB behind a held stream: far past one head plus one body
            writer.write(b"x" * 65536)
            await writer.drain()
    except ConnectionError:
        pass
    try:  # the front aborted the connection: EOF or a reset, never a hang or the rest of the stream
        remaining = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        remaining = b""
    assert b"[DONE]" not in remaining
    for _ in range(50):
        if upstream.cancelled:
            break
        await asyncio.sleep(0.05)
    assert upstream.cancelled == 1  # the held upstream request was closed with the client
    upstream.release.set()
    writer.close()
