"""A misbehaving worker, through both fronts and both event loops: bad framing becomes a 502 before the first
byte reached the client, an SSE error event or a cut connection after it; never a hang or a traceback, and
the worker connection that carried it is closed, never pooled again."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from lb.state import STATE
from tests.lb_recorder import SCRIPTS, Recorder
from tests.lb_upstream import both_loops
from tests.test_lb_adversarial import check_error_body, good, read_response

event_loop_policy = pytest.fixture(scope="module", params=["asyncio", "uvloop"])(both_loops)

VALID = ("bytes-after-response", "hop-by-hop")
BEFORE_FIRST_BYTE = [name for name in SCRIPTS if "later" not in name and name not in VALID]
HOP_BY_HOP = (b"\r\nx-hop:", b"\r\nkeep-alive:", b"\r\nproxy-connection:", b"\r\ntrailer:")


async def exchange(port: int, script: str) -> tuple[int, bytes, bool, bytes]:
    """(status, body without chunk framing, whether the response ended properly, head) for a script."""
    body = b'{"model": "tiny", "messages": []}'
    head = b""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nX-Script: %b\r\nContent-Length: %d\r\n\r\n%b"
        % (script.encode(), len(body), body)
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ")[1])
        if b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            return status, await asyncio.wait_for(reader.readexactly(length), 5), True, head
        out = b""
        while True:  # chunked
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, out, True, head
            out += (await reader.readexactly(size + 2))[:-2]
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return status, b"", False, head
    finally:
        writer.close()


@pytest_asyncio.fixture(loop_scope="function")
async def cluster(balancer: Any, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Recorder, int, Any]]:
    recorder = await Recorder().start()
    url = await balancer(
        [recorder], fast_front=request.param, health_check_interval=0.05, healthy_threshold=1
    )
    yield recorder, int(url.rsplit(":", 1)[1]), balancer.apps[-1][STATE].pool
    await recorder.stop()


async def until(predicate: Any, timeout: float = 3) -> bool:  # noqa: ASYNC109
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())


@pytest.mark.parametrize("cluster", [True, False], ids=["fast-front", "aiohttp-front"], indirect=True)
async def test_a_misbehaving_worker_never_breaks_the_client_or_the_pool(
    cluster: tuple[Recorder, int, Any], caplog: pytest.LogCaptureFixture
) -> None:
    recorder, port, pool = cluster
    problems: list[str] = []
    caplog.set_level(logging.WARNING)
    for script in SCRIPTS:
        assert await until(lambda: bool(pool.routable)), "the worker never came back"
        status, body, complete, head = await exchange(port, script)
        if script in BEFORE_FIRST_BYTE:
            if status != 502 or check_error_body({"content-type": "application/json"}, body) is not None:
                problems.append(f"{script}: {status} {body[:100]!r}, expected a 502 error body")
        elif script == "bytes-after-response":
            if status != 200 or b"SMUGGLED" in body:
                problems.append(f"{script}: {status} {body[:100]!r}")
        elif script == "hop-by-hop":
            leaked = [h for h in HOP_BY_HOP if h in head.lower()]
            if status != 200 or leaked or b"\r\nx-kept: 1" not in head.lower():
                problems.append(f"{script}: {status}, hop-by-hop headers reached the client: {leaked}")
        elif script.startswith("sse-"):
            error = body.rsplit(b"data: ", 1)[-1]
            if status != 200 or not complete or b'"error"' not in error or b"delta" not in body:
                problems.append(f"{script}: expected the first event then an SSE error event, got {body!r}")
        elif complete:
            problems.append(f"{script}: a body broken after its first byte ended as if whole: {body!r}")
        carriers = [
            c for c in recorder.connections if b"X-Script: " + script.encode() + b"\r\n" in c.received
        ]
        carrier = carriers[0] if len(carriers) == 1 else None
        if script == "hop-by-hop":
            pass  # a clean response: its connection goes back to the pool
        elif carrier is None or not await until(lambda: carrier.closed):  # noqa: B023 - awaited right here
            problems.append(f"{script}: the worker connection was not closed ({len(carriers)} carried it)")
        assert await until(lambda: bool(pool.routable)), "the worker never came back"
        follow = await asyncio.open_connection("127.0.0.1", port)
        follow[1].write(good())
        answer = await asyncio.wait_for(read_response(follow[0]), 5)
        follow[1].close()
        if answer[0] != 200 or json.loads(answer[2]).get("id") != "ok":
            problems.append(f"{script}: the next request got {answer[0]} {answer[2][:80]!r}")
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not problems and not tracebacks, "\n".join(problems + tracebacks)
