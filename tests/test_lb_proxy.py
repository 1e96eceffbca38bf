"""Proxy behaviour over real sockets: forwarding, streaming, retries, disconnects, in-flight accounting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lb.state import STATE
from tests.lb_upstream import both_loops, chat

CHAT = "/v1/chat/completions"
event_loop_policy = pytest.fixture(scope="module", params=["asyncio", "uvloop"])(both_loops)


@pytest.mark.parametrize("fast_front", [True, False])
async def test_forwards_and_labels_the_worker(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, fast_front: bool
) -> None:
    a, b = await upstreams(), await upstreams()
    url = await balancer([a, b], policy="round_robin", fast_front=fast_front)
    workers = []
    for _ in range(4):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"] == "hi"
            assert resp.headers["X-LB-Retries"] == "0"
            workers.append(resp.headers["X-LB-Worker"])
    assert workers == ["0", "1", "0", "1"]
    assert a.bodies[0] == json.dumps(chat()).encode()  # the body passes through byte for byte


@pytest.mark.parametrize("fast_front", [True, False])
async def test_sse_chunks_are_not_buffered(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, fast_front: bool
) -> None:
    up = await upstreams()
    url = await balancer([up], fast_front=fast_front)
    async with http.post(url + CHAT, json=chat(stream=True, hold=True)) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert b"t0" in first  # arrived while the upstream still holds the rest of the stream
        up.release.set()
        rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_retries_a_503_on_another_backend(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    draining, ok = await upstreams(), await upstreams()
    url = await balancer([draining, ok], policy="round_robin")
    draining.status = 503
    retries = 0
    for _ in range(4):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.status == 200
            assert resp.headers["X-LB-Worker"] == "1"
            retries += int(resp.headers["X-LB-Retries"])
    assert draining.requests >= 1 and retries == draining.requests  # each 503 was one retry, and said so


async def test_refused_connection_is_retried_and_marks_backend_down(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    dead, ok = await upstreams(), await upstreams()
    url = await balancer([dead, ok], policy="round_robin", health_check_interval=30)
    await dead.stop()
    retries = []
    for _ in range(4):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.status == 200 and resp.headers["X-LB-Worker"] == "1"
            retries.append(resp.headers["X-LB-Retries"])
    assert retries[0] == "1"  # round robin sent the first to the dead backend, then retried it elsewhere
    async with http.get(url + "/stats") as resp:
        stats = await resp.json()
    assert [w["healthy"] for w in stats["workers"]] == [False, True]


@pytest.mark.parametrize("fast_front", [True, False])
async def test_upstream_dying_mid_stream_ends_with_error_event(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, fast_front: bool
) -> None:
    up = await upstreams()
    url = await balancer([up], fast_front=fast_front)
    async with http.post(url + CHAT, json=chat(stream=True, die_after=2)) as resp:
        assert resp.status == 200
        body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert b"t0" in events[0] and b"t1" in events[1]
    assert json.loads(events[-1][len(b"data: ") :])["error"]["code"] == "upstream_disconnected"


@pytest.mark.parametrize("fast_front", [True, False])
async def test_client_disconnect_cancels_upstream_and_releases_in_flight(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, fast_front: bool
) -> None:
    up = await upstreams()
    url = await balancer([up], fast_front=fast_front)
    backend = balancer.apps[0][STATE].pool.backends[0]
    resp = await http.post(url + CHAT, json=chat(stream=True, hold=True))
    await resp.content.readuntil(b"\n\n")
    assert backend.in_flight == 1
    resp.close()  # the client goes away mid-stream
    for _ in range(100):
        if up.cancelled and backend.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert up.cancelled == 1 and up.finished == 0
    assert backend.in_flight == 0


async def test_large_body_is_streamed_through(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer([up])
    payload = json.dumps(chat() | {"padding": "x" * (3 << 20)}).encode()  # over the 1 MiB kept for retries

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 256 << 10):
            yield payload[start : start + (256 << 10)]

    async with http.post(url + CHAT, data=pieces(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
    assert up.bodies[-1] == payload


async def test_full_worker_429_is_retried_elsewhere(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    full, ok = await upstreams(), await upstreams()
    url = await balancer([full, ok], policy="round_robin")
    full.status = 429
    retries = 0
    for _ in range(3):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.status == 200 and resp.headers["X-LB-Worker"] == "1"
            retries += int(resp.headers["X-LB-Retries"])
    assert full.requests >= 1 and retries == full.requests
    async with http.get(url + "/stats") as resp:
        assert (await resp.json())["workers"][0]["healthy"]  # full is not dead


@pytest.mark.parametrize("cap", [None, 2])
async def test_in_flight_counts_never_drift_under_mixed_load(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, cap: int | None
) -> None:
    ups = [await upstreams() for _ in range(3)]
    ups[0].status = 503  # every attempt there is retried elsewhere
    for up in ups:
        up.chunks = 20
    settings = {"max_inflight_per_worker": cap, "max_queue": 1000} if cap else {}
    url = await balancer(ups, policy="power_of_two", **settings)
    pool = balancer.apps[0][STATE].pool

    async def one(i: int) -> None:
        body = chat(stream=i % 2 == 0)
        try:
            async with asyncio.timeout(0.005 * (i % 7) if i % 3 == 0 else 30):  # a third leave early
                async with http.post(url + CHAT, json=body) as resp:
                    await resp.read()
        except TimeoutError:
            pass

    await asyncio.gather(*(one(i) for i in range(150)))
    for _ in range(100):
        if all(b.in_flight == 0 and b.reserved == 0 for b in pool.backends):
            break
        await asyncio.sleep(0.02)
    assert [(b.in_flight, b.reserved) for b in pool.backends] == [(0, 0)] * 3
    assert sum(b.requests_served for b in pool.backends) > 0
