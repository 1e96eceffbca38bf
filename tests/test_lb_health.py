"""Health checks against a real HTTP upstream: thresholds, busy-but-alive, passive mark-down, models."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio

from lb.backends import Backend, BackendPool
from lb.health import HealthChecker
from tests.lb_upstream import Upstream


@pytest_asyncio.fixture(loop_scope="function")
async def upstream() -> AsyncIterator[Upstream]:
    up = await Upstream("tiny").start()
    yield up
    await up.stop()


@pytest_asyncio.fixture(loop_scope="function")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def checker(pool: BackendPool, session: aiohttp.ClientSession, timeout: float = 0.3) -> HealthChecker:
    return HealthChecker(
        pool, session, interval=1.0, timeout=timeout, unhealthy_threshold=3, healthy_threshold=2
    )


async def healthy_backend(pool: BackendPool, health: HealthChecker, url: str) -> Backend:
    backend = pool.add(url)
    await health.check(backend)
    assert backend.healthy and backend.models == frozenset({"tiny"})
    return backend


async def test_dropped_after_threshold_failures_and_re_added_after_threshold_successes(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    pool = BackendPool()
    health = checker(pool, session)
    backend = await healthy_backend(pool, health, upstream.url)
    upstream.health_status = 503  # e.g. the worker is draining
    for _ in range(2):
        await health.check(backend)
    assert backend.healthy and backend.consecutive_failures == 2
    await health.check(backend)
    assert not backend.healthy and pool.routable == []
    upstream.health_status = 200
    await health.check(backend)
    assert not backend.healthy  # one good probe is not enough once dropped
    await health.check(backend)
    assert backend.healthy and pool.routable == [backend]


async def test_busy_worker_with_slow_probe_is_not_ejected(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    pool = BackendPool()
    health = checker(pool, session, timeout=0.1)
    backend = await healthy_backend(pool, health, upstream.url)
    upstream.health_delay = 0.3  # probes time out ...
    backend.last_progress = time.monotonic()  # ... but it is streaming responses right now
    for _ in range(5):
        await health.check(backend)
    assert backend.healthy and backend.consecutive_failures == 0
    backend.last_progress = 0.0  # silent and slow: that is a failure
    for _ in range(3):
        await health.check(backend)
    assert not backend.healthy


async def test_refused_connection_marks_down_at_once(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    pool = BackendPool()
    health = checker(pool, session)
    backend = await healthy_backend(pool, health, upstream.url)
    health.mark_down(backend, "connection refused")
    assert not backend.healthy and backend.consecutive_failures >= health.unhealthy_threshold


async def test_models_come_from_v1_models_when_health_names_none(session: aiohttp.ClientSession) -> None:
    from aiohttp import web

    from tests.processes import free_port

    async def bare_health(request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]})

    app = web.Application()
    app.router.add_get("/health", bare_health)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        pool = BackendPool()
        backend = pool.add(f"http://127.0.0.1:{port}")
        await checker(pool, session).check(backend)
        assert backend.healthy and backend.models == frozenset({"m1", "m2"})
    finally:
        await runner.cleanup()
