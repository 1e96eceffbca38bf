"""Admission's two classes: interactive requests go first, bulk ones (batch lines, X-LB-Priority: bulk) wait
behind any queued interactive request and never take more than the bulk cap on a backend."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from lb.admission import Admission, is_bulk
from lb.backends import BackendPool
from lb.policies import RoundRobin
from tests.lb_upstream import chat


def one_backend_pool() -> BackendPool:
    pool = BackendPool()
    pool.set_health(pool.add("http://127.0.0.1:9000"), True)
    return pool


async def test_bulk_waits_while_an_interactive_request_is_queued() -> None:
    pool = one_backend_pool()
    admission = Admission(
        pool, RoundRobin(), max_inflight_per_worker=1, max_queue=8, queue_timeout=5, bulk_cap=1
    )
    backend = pool.backends[0]
    order: list[str] = []

    async def request(name: str, bulk: bool) -> None:
        chosen = await admission.choose(lambda: pool.routable, bulk=bulk, patient=bulk)
        async with pool.track(chosen, bulk):
            order.append(name)
            await asyncio.sleep(0.01)

    holder = pool.track(backend)
    await holder.__aenter__()  # the one slot is busy
    bulk = asyncio.create_task(request("bulk", True))  # queued first ...
    await asyncio.sleep(0)
    interactive = asyncio.create_task(request("interactive", False))  # ... but this one goes first
    await asyncio.sleep(0)
    assert admission.depth == 1 and admission.bulk_depth == 1
    await holder.__aexit__(None, None, None)
    await asyncio.gather(bulk, interactive)
    assert order == ["interactive", "bulk"]
    assert backend.in_flight == backend.reserved == backend.bulk_in_flight == backend.bulk_reserved == 0


async def test_bulk_never_takes_more_than_its_cap_but_interactive_still_gets_in() -> None:
    pool = one_backend_pool()
    admission = Admission(
        pool, RoundRobin(), max_inflight_per_worker=None, max_queue=8, queue_timeout=5, bulk_cap=2
    )
    backend = pool.backends[0]
    for _ in range(2):
        chosen = await admission.choose(lambda: pool.routable, bulk=True)
        await pool.track(chosen, True).__aenter__()
    third = asyncio.create_task(admission.choose(lambda: pool.routable, bulk=True, patient=True))
    await asyncio.sleep(0.01)
    assert not third.done() and backend.bulk_in_flight == 2
    pool.release(backend, True)  # one bulk line ends: the waiting one gets its slot
    assert await asyncio.wait_for(third, 1) is backend
    assert await admission.choose(lambda: pool.routable) is backend  # interactive: not held by the bulk cap


def test_bulk_limit_defaults_to_twice_the_workers_batch_size() -> None:
    pool = one_backend_pool()
    admission = Admission(pool, RoundRobin(), max_inflight_per_worker=None, max_queue=8, queue_timeout=5)
    backend = pool.backends[0]
    assert admission.bulk_limit(backend, interactive_recent=False) == 16  # /health gave no batch size: 8
    backend.batch_size = 4
    assert admission.bulk_limit(backend, interactive_recent=False) == 8
    assert admission.bulk_limit(backend, interactive_recent=True) == 3


async def test_recent_interactive_traffic_keeps_one_slot_of_the_workers_batch_free() -> None:
    pool = one_backend_pool()
    admission = Admission(pool, RoundRobin(), max_inflight_per_worker=None, max_queue=8, queue_timeout=5)
    backend = pool.backends[0]
    backend.batch_size = 3  # bulk may hold 6 (its batch and as many waiting) ...
    await admission.choose(lambda: pool.routable)  # ... but an interactive request just arrived
    for _ in range(2):
        await pool.track(await admission.choose(lambda: pool.routable, bulk=True), True).__aenter__()
    third = asyncio.create_task(admission.choose(lambda: pool.routable, bulk=True, patient=True))
    await asyncio.sleep(0.01)
    assert not third.done()  # one slot of the worker's batch of 3 stays free for interactive requests
    third.cancel()
    assert backend.bulk_in_flight == 2 and backend.bulk_reserved == 0


def test_priority_header_marks_a_request_bulk() -> None:
    assert is_bulk([(b"Content-Type", b"application/json"), (b"X-LB-Priority", b"bulk")])
    assert is_bulk([(b"x-lb-priority", b" BULK ")])
    assert not is_bulk([(b"X-LB-Priority", b"interactive")])
    assert not is_bulk([(b"Content-Type", b"application/json")])


async def test_a_client_marked_bulk_waits_for_a_bulk_slot_while_interactive_passes(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer([up], batch_max_inflight_per_worker=1)
    bulk = {"X-LB-Priority": "bulk"}
    first = await http.post(url + "/v1/chat/completions", json=chat(stream=True, hold=True), headers=bulk)
    await first.content.readline()  # its stream holds the only bulk slot
    second = asyncio.create_task(http.post(url + "/v1/chat/completions", json=chat(), headers=bulk))
    await asyncio.sleep(0.2)
    assert up.requests == 1  # the second bulk request waits in the balancer
    async with http.post(url + "/v1/chat/completions", json=chat()) as resp:  # interactive: straight through
        assert resp.status == 200
    assert up.requests == 2 and not second.done()
    up.release.set()
    await first.read()
    first.release()
    async with await second as resp:
        assert resp.status == 200
    assert up.requests == 3
