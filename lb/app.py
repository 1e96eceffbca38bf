"""create_app(config): the balancer's state, its start-up and shutdown order, and its routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from lb import api_cluster, api_models, api_solve, api_status, logs
from lb.admin import Admin
from lb.admission import Admission
from lb.aiohttp_server import json_http_errors
from lb.autoscale import Autoscaler
from lb.backends import BackendPool
from lb.config import BalancerConfig
from lb.datastore import connect
from lb.discovery import Discovery, parse_ranges
from lb.health import HealthChecker
from lb.jobs import api_batches, api_files, api_jobs
from lb.jobs.batches import BatchService
from lb.metrics import Metrics
from lb.model_routing import ModelRouter
from lb.policies import POLICIES, Tuning
from lb.progress import running_work
from lb.proxy import Proxy
from lb.registry import Registry
from lb.rollout import Switcher
from lb.state import STATE, BalancerState
from lb.telemetry import TelemetryGatherer
from lb.tracing import Tracer
from lb.upstream import UpstreamClient

log = logging.getLogger("lb")


def _session() -> aiohttp.ClientSession:
    """The aiohttp client for probes and admin calls (proxied requests use UpstreamClient)."""
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
    app = web.Application(
        middlewares=[json_http_errors],
        client_max_size=config.max_body_size,
        handler_args={  # for connections the front hands to aiohttp: the same bounds as the front's
            "max_field_size": config.max_header_line,
            "max_line_size": config.max_header_line,
            "keepalive_timeout": config.keepalive_timeout,
            "lingering_time": 2.0,  # seconds an unread body is drained after a refusal, as the front does
        },
    )
    pool = BackendPool()
    for url, weight in config.worker_specs():
        pool.add(url, weight=weight)
    admission = Admission(
        pool,
        POLICIES[config.policy](Tuning(affinity_max_load=config.affinity_max_load)),
        config.max_inflight_per_worker,
        config.max_queue,
        config.queue_timeout,
        bulk_cap=config.batch_max_inflight_per_worker,
    )
    metrics = Metrics(pool, lambda: admission.depth)
    admission.on_wait = metrics.waited
    if config.otlp_endpoint:  # only then is opentelemetry imported
        metrics.tracer = Tracer(config.otlp_endpoint)
    app[STATE] = BalancerState(config, pool, ModelRouter(pool), admission, metrics)
    app[STATE].log_files = config.log_files()
    app.cleanup_ctx.append(_client_and_checker)
    api_status.add_routes(app)
    api_files.add_routes(app)
    api_batches.add_routes(app)
    api_jobs.add_routes(app)  # also starts the job runner, after the start-up steps above
    api_solve.add_routes(app)
    api_cluster.add_routes(app)
    logs.add_routes(app)
    api_models.add_routes(app)
    api_status.add_catch_all(app)  # last: it matches every path
    return app


async def _client_and_checker(app: web.Application) -> AsyncIterator[None]:
    """Start-up and shutdown, in order; each step undone in reverse on exit."""
    state = app[STATE]
    config = state.config
    # 1. one pooled aiohttp session for probes and admin calls
    state.session = _session()
    # 2. the health checker and the admin API that adds workers through it
    state.health = HealthChecker(
        state.pool,
        state.session,
        interval=config.health_check_interval,
        timeout=config.health_check_timeout,
        unhealthy_threshold=config.unhealthy_threshold,
        healthy_threshold=config.healthy_threshold,
    )
    state.admin = Admin(state.pool, state.health, config.admin_secret(), config.drain_timeout)
    # 2b. the checkpoint registry (in --data-dir) and its rolling switch over the workers' /admin/load
    state.switcher = Switcher(state.pool, state.router, state.admin, Registry(connect(config.data_dir)),
                              state.session, config.admin_secret(), config.model_load_timeout)
    state.router.set_redirects(state.switcher.registry.redirects())
    # 3. the proxy's upstream client: no total timeout, a stream that keeps producing may run for hours;
    #    silence is what times out
    client = UpstreamClient(connect_timeout=config.connect_timeout, read_timeout=config.request_timeout)
    state.proxy = Proxy(
        config, state.pool, state.admission, state.router, state.health, state.metrics, client
    )
    # 4. a first probe of every worker, so those already up take traffic from the first request
    await state.health.check_all()
    task = asyncio.create_task(state.health.run(), name="lb-health")
    expiry = asyncio.create_task(client.expire_idle(), name="lb-upstream-idle")
    # 5. batches: resume the unfinished ones in --data-dir, then dispatch (workers' models are known now)
    state.batches = BatchService(
        config, state.pool, state.router, state.admission, state.health, state.metrics, client
    )
    await state.batches.start()
    # 6. the telemetry gatherer behind /cluster and the dashboard: background reads, never on a request
    state.telemetry = TelemetryGatherer(
        state.pool,
        state.session,
        state.metrics.recent,
        lambda: state.admission.depth,
        interval=config.telemetry_interval,
        timeout=min(config.telemetry_interval, config.health_check_timeout),
        work=lambda: running_work(state),
    )
    telemetry = asyncio.create_task(state.telemetry.run(), name="lb-telemetry")
    background = [expiry, task, telemetry]
    # 7. --discover: scan port ranges for workers in the background (a thread sweeps, the loop probes)
    if config.discover:
        discovery = Discovery(
            state.pool,
            state.health,
            parse_ranges(config.discover, config.discover_skip_ports),
            interval=config.discover_interval,
            timeout=config.health_check_timeout,
            own=(config.host, config.port),
        )
        background.append(asyncio.create_task(discovery.run(), name="lb-discovery"))
    # 8. --scale-command: ask for more or fewer workers when the queue stays long or empty
    if config.scale_command:
        admission = state.admission
        autoscaler = Autoscaler(
            config.scale_command,
            state.pool,
            lambda: admission.depth + admission.bulk_depth,
            state.metrics,
            minimum=config.scale_min,
            maximum=config.scale_max,
            up_queue=config.scale_up_queue,
            down_queue=config.scale_down_queue,
            window=config.scale_window,
            cooldown=config.scale_cooldown,
            cap=config.max_inflight_per_worker,
        )
        background.append(asyncio.create_task(autoscaler.run(), name="lb-autoscale"))
    yield
    await state.batches.stop()  # lines in flight are sent again after a restart
    if state.switcher.task is not None:  # a switch cut short leaves each worker serving a whole model
        state.switcher.task.cancel()
    for job in reversed(background):
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
    client.close()
    await state.session.close()
    if state.metrics.tracer is not None:
        await asyncio.to_thread(state.metrics.tracer.close)  # exports the spans still buffered
