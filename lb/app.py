"""create_app(config): pool, policy, admission, health checker, proxy and routes of one balancer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from lb.admin import Admin
from lb.admission import Admission
from lb.backends import BackendPool
from lb.config import BalancerConfig
from lb.errors import BalancerError, NotFound, answers_errors, error_response
from lb.health import HealthChecker
from lb.metrics import Metrics
from lb.model_routing import ModelRouter
from lb.policies import POLICIES
from lb.proxy import HOT_PATHS, Proxy
from lb.stats import backend_stats, health, stats
from lb.upstream import UpstreamClient

log = logging.getLogger("lb")

CONFIG = web.AppKey("config", BalancerConfig)
POOL = web.AppKey("pool", BackendPool)
ADMISSION = web.AppKey("admission", Admission)
HEALTH = web.AppKey("health", HealthChecker)
PROXY = web.AppKey("proxy", Proxy)
METRICS = web.AppKey("metrics", Metrics)
ROUTER = web.AppKey("router", ModelRouter)
ADMIN = web.AppKey("admin", Admin)


class BalancerState:
    """Process-level facts the info routes report: start time and whether shutdown has begun."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.draining = False


STATE = web.AppKey("state", BalancerState)


def _session(config: BalancerConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # no global cap: the admission queue is the one place that limits concurrency
        limit_per_host=0,
        keepalive_timeout=30,  # seconds; shorter than aiohttp workers' 75 s, so we close idle sockets first
        ttl_dns_cache=None,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bytes pass through with their Content-Encoding
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
        trust_env=False,
    )


def create_app(config: BalancerConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_body_size, handler_args={"max_field_size": 65536})
    pool = BackendPool()
    policy = POLICIES[config.policy]()
    router = ModelRouter(pool)
    for url in config.worker_urls():
        pool.add(url)
    app[CONFIG] = config
    app[POOL] = pool
    app[ROUTER] = router
    app[STATE] = BalancerState()
    app[ADMISSION] = Admission(
        pool,
        policy,
        config.max_inflight_per_worker,
        config.max_queue,
        config.queue_timeout,
    )
    app[METRICS] = Metrics(pool, lambda: app[ADMISSION].depth)
    app[ADMISSION].on_wait = app[METRICS].queue_wait.observe
    app.cleanup_ctx.append(_client_and_checker)
    _add_routes(app)
    return app


async def _client_and_checker(app: web.Application) -> AsyncIterator[None]:
    """Startup: one pooled session, a first probe of every worker, the periodic checker; reversed on exit."""
    config = app[CONFIG]
    session = _session(config)
    checker = HealthChecker(
        app[POOL],
        session,
        interval=config.health_check_interval,
        timeout=config.health_check_timeout,
        unhealthy_threshold=config.unhealthy_threshold,
        healthy_threshold=config.healthy_threshold,
    )
    app[HEALTH] = checker
    app[ADMIN] = Admin(app[POOL], checker, config.admin_token, config.drain_timeout)
    # no total timeout: a stream that keeps producing may run for hours; silence is what times out
    client = UpstreamClient(connect_timeout=config.connect_timeout, read_timeout=config.request_timeout)
    app[PROXY] = Proxy(config, app[POOL], app[ADMISSION], app[ROUTER], checker, app[METRICS], client)
    await checker.check_all()  # so workers that are already up take traffic from the first request
    task = asyncio.create_task(checker.run(), name="lb-health")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    client.close()
    await session.close()


def _add_routes(app: web.Application) -> None:
    config = app[CONFIG]

    async def proxy(request: web.Request) -> web.StreamResponse:
        return await app[PROXY].handle(request)

    async def balancer_health(request: web.Request) -> web.Response:
        status, body = health(app[POOL], app[STATE].draining)
        return web.json_response(body, status=status)

    async def get_stats(request: web.Request) -> web.Response:
        body = stats(
            app[POOL],
            policy=config.policy,
            total_requests=app[PROXY].total_requests,
            started=app[STATE].started,
            queue_depth=app[ADMISSION].depth,
        )
        return web.json_response(body)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=app[METRICS].render(), content_type="text/plain", charset="utf-8")

    async def list_models(request: web.Request) -> web.StreamResponse:
        try:
            app[PROXY].check_key(request.headers.get("Authorization"))  # a /v1 path: same keys as the proxy
        except BalancerError as exc:
            return error_response(exc)
        models = app[POOL].models()
        if not models:
            return await proxy(request)  # workers that do not announce their models: ask one of them
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "inference-balancer"} for m in models]
        return web.json_response({"object": "list", "data": data})

    async def not_found(request: web.Request) -> web.Response:
        return error_response(NotFound(f"Unknown path: {request.method} {request.path}"))

    async def add_worker(request: web.Request) -> web.StreamResponse:
        return await app[ADMIN].add_worker(request)

    async def remove_worker(request: web.Request) -> web.StreamResponse:
        return await app[ADMIN].remove_worker(request)

    async def list_workers(request: web.Request) -> web.Response:
        return web.json_response([backend_stats(b) for b in app[POOL].backends])

    app.router.add_get("/health", balancer_health)
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/workers", answers_errors(add_worker))
    app.router.add_delete("/workers/{index}", answers_errors(remove_worker))
    app.router.add_get("/workers", list_workers)
    for path in HOT_PATHS:  # plain routes resolve by dict lookup, before the regex of the catch-all below
        app.router.add_route("*", path, proxy)
    app.router.add_route("*", "/v1/{tail:.*}", proxy)
    app.router.add_route("*", "/{tail:.*}", not_found)
