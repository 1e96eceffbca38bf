"""What one client may hold: a head deadline that trickled bytes do not extend, a body received before the
request takes a worker slot, a cap on open connections; and whose credentials reach a worker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.lb_recorder import Recorder
from tests.test_lb_adversarial import check_error_body, good, read_response

FRONTS = pytest.mark.parametrize("fast_front", [True, False], ids=["fast-front", "aiohttp-front"])
BODY = b'{"model": "tiny", "messages": []}'


@pytest_asyncio.fixture(loop_scope="function")
async def recorder() -> AsyncIterator[Recorder]:
    recorder = await Recorder().start()
    yield recorder
    await recorder.stop()


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))


async def ask(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(url)
    writer.write(data)
    try:
        return await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()


@FRONTS
async def test_a_trickled_head_gets_408_at_the_header_deadline(
    balancer: Any, recorder: Recorder, fast_front: bool
) -> None:
    url = await balancer([recorder], fast_front=fast_front, header_timeout=0.5)
    reader, writer = await connect(url)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nX-Slow: " + b"a" * 100
    started = time.monotonic()
    answer = asyncio.ensure_future(read_response(reader))
    for byte in head:  # one byte every 50 ms: each one would re-arm an idle timer
        if answer.done():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)
    status, headers, body = await asyncio.wait_for(answer, 5)
    writer.close()
    assert status == 408 and check_error_body(headers, body) is None
    assert time.monotonic() - started < 2.5  # the head would have taken 5 s to trickle in
    assert recorder.since({}) == b""


@FRONTS
async def test_a_slow_upload_holds_no_worker_slot(
    balancer: Any, recorder: Recorder, fast_front: bool
) -> None:
    url = await balancer([recorder], fast_front=fast_front, max_inflight_per_worker=1, max_queue=0)
    slow_reader, slow = await connect(url)
    if fast_front:  # the lean front: a Content-Length body, sent in part
        slow.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nContent-Length: %d\r\n\r\n" % len(BODY)
        )
        slow.write(BODY[:5])
    else:  # aiohttp: a chunked upload, one chunk so far
        slow.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding: chunked\r\n\r\n")
        slow.write(b"5\r\n%b\r\n" % BODY[:5])
    await asyncio.sleep(0.3)
    status, _, body = await ask(url, good())  # with the only slot held by the uploader this would be 429
    assert status == 200, body
    assert recorder.requests_since({}) != [] and b"Transfer-Encoding" not in recorder.since({})
    slow.write(BODY[5:] if fast_front else b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY) - 5, BODY[5:]))
    status, _, body = await asyncio.wait_for(read_response(slow_reader), 5)
    slow.close()
    assert status == 200, body
    assert recorder.since({}).count(BODY) == 1  # the upload reached the worker whole, once


@FRONTS
async def test_connections_above_the_cap_are_refused_with_503(
    balancer: Any, recorder: Recorder, fast_front: bool
) -> None:
    url = await balancer([recorder], fast_front=fast_front, max_connections=2)
    first = await connect(url)
    second = await connect(url)
    second[1].write(b"GET /livez HTTP/1.1\r\nHost: lb\r\n\r\n")  # handed to aiohttp: still counted
    assert (await asyncio.wait_for(read_response(second[0]), 5))[0] == 200
    status, headers, body = await ask(url, good())
    assert status == 503 and json.loads(body)["error"]["code"] == "too_many_connections"
    assert headers["retry-after"] == "1"
    first[1].close()
    second[1].close()
    await asyncio.sleep(0.2)
    assert (await ask(url, good()))[0] == 200


CREDENTIALS = b"Authorization: Bearer client-key\r\nX-API-Key: client-key\r\n"


def with_credentials(fast_front: bool) -> bytes:
    if fast_front:
        return b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\n%bContent-Length: %d\r\n\r\n%b" % (
            CREDENTIALS,
            len(BODY),
            BODY,
        )
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\n%bTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%b\r\n0\r\n\r\n"
        % (
            CREDENTIALS,
            len(BODY),
            BODY,
        )
    )


@FRONTS
@pytest.mark.parametrize(
    ("settings", "forwarded"),
    [
        ({}, [b"authorization: bearer client-key", b"x-api-key: client-key"]),  # workers' own keys pass
        ({"api_key": ["client-key"]}, []),  # the balancer checked it: not the worker's business
        ({"api_key": ["client-key"], "worker_api_key": "worker-key"}, [b"authorization: bearer worker-key"]),
    ],
    ids=["no-balancer-key", "balancer-key", "worker-key"],
)
async def test_which_credentials_reach_the_worker(
    balancer: Any, recorder: Recorder, fast_front: bool, settings: dict[str, Any], forwarded: list[bytes]
) -> None:
    url = await balancer([recorder], fast_front=fast_front, **settings)
    status, _, body = await ask(url, with_credentials(fast_front))  # chunked: the aiohttp path
    assert status == 200, body
    head = recorder.since({}).split(b"\r\n\r\n", 1)[0].lower()
    sent = [line for line in head.split(b"\r\n") if line.startswith((b"authorization:", b"x-api-key:"))]
    assert sent == forwarded


@FRONTS
async def test_an_idle_connection_closes_at_the_keepalive_timeout_a_busy_one_stays(
    balancer: Any, recorder: Recorder, fast_front: bool
) -> None:
    url = await balancer([recorder], fast_front=fast_front, keepalive_timeout=0.6)
    reader, writer = await connect(url)
    for _ in range(4):  # 1.2 s of requests 0.3 s apart: each resets the idle clock
        writer.write(good())
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        await asyncio.sleep(0.3)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then idle: closed
    assert 0.2 < time.monotonic() - started < 2.5
    writer.close()
