"""The worker's app factory and process lifecycle.

Start-up: bind the port at once and answer /health with 503 "loading" while the engine loads on its own
thread, then 200 "ok". Shutdown on SIGTERM/SIGINT: stop accepting (health 503 "draining", new generation
requests 503, listening socket closed), let queued and running requests finish within `drain_timeout`,
cut off the rest, close connections, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator

from aiohttp import web

from workers import api_admin, api_info, api_native, api_openai, api_status, api_telemetry
from workers.batcher import DynamicBatcher
from workers.config import WorkerConfig
from workers.engines import create_engine
from workers.engines.base import Engine
from workers.errors import Handler, error_middleware
from workers.gpu import gpu_info
from workers.metrics import WorkerMetrics
from workers.state import STATE, WorkerState

log = logging.getLogger("workers")

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/generate": "generate"}
LOAD_TASK = web.AppKey("load_task", asyncio.Task[None])
MAX_BODY_BYTES = 32 * 1024 * 1024
CLIENT_GONE = 499  # nginx's status for "client closed the request", used in metrics only


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count generation requests by endpoint and status; latency of the successful ones."""
    endpoint = GENERATION_PATHS.get(request.path)
    if endpoint is None:
        return await handler(request)
    started = time.monotonic()
    status = CLIENT_GONE
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        seconds = time.monotonic() - started if status == 200 else None
        request.app[STATE].metrics.observe_request(endpoint, status, seconds)


def create_app(config: WorkerConfig, engine: Engine) -> web.Application:
    """A worker app around an engine that is not loaded yet; it loads when the app starts."""
    metrics = WorkerMetrics(config.model_name)
    batcher = DynamicBatcher(engine, batch_size=config.batch_size, max_wait_time=config.max_wait_time,
                             max_queue=config.max_queue, metrics=metrics)
    metrics.track_load(lambda: batcher.queue_depth, lambda: batcher.running)
    metrics.track_cap(batcher.cap.current)
    app = web.Application(middlewares=[metrics_middleware, error_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = WorkerState(config, engine, batcher, metrics)
    app.router.add_get("/health", api_status.health)
    app.router.add_get("/v1/models", api_status.models)
    app.router.add_get("/metrics", api_status.metrics)
    app.router.add_post("/v1/completions", api_openai.completions)
    app.router.add_post("/v1/chat/completions", api_openai.chat_completions)
    app.router.add_post("/generate", api_native.generate)
    api_telemetry.add_routes(app)
    app.router.add_post("/admin/load", api_admin.load)
    app.router.add_get("/admin/load", api_admin.latest)
    app.router.add_get("/version", api_info.version)
    app.router.add_get("/info", api_info.info)
    app.cleanup_ctx.append(_engine_lifecycle)
    return app


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    app[LOAD_TASK] = asyncio.create_task(_load(state), name="load-engine")
    yield
    app[LOAD_TASK].cancel()
    await state.batcher.close()


async def _load(state: WorkerState) -> None:
    config = state.config
    started = time.monotonic()
    log.info("loading the %s engine (model %s, device %s)", config.engine, config.model_name, config.device)
    try:
        await state.batcher.start()
        info = state.engine.info
        state.gpu = await asyncio.to_thread(gpu_info, info.device)
    except Exception as exc:
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("loading the engine failed")
        raise
    if state.status == "loading":
        state.status = "ok"
    log.info("engine ready in %.1fs: engine=%s model=%s device=%s max_model_len=%d batch_size=%d",
             time.monotonic() - started, info.engine, info.model, info.device, info.max_model_len,
             config.batch_size)


async def serve(config: WorkerConfig) -> int:
    """Run one worker until SIGTERM/SIGINT; the process exit code (0 clean, 1 failed)."""
    app = create_app(config, create_engine(config))
    access_log = logging.getLogger("aiohttp.access") if config.log_level == "debug" else None
    runner = web.AppRunner(app, handler_cancellation=True, access_log=access_log, shutdown_timeout=5.0)
    await runner.setup()  # starts loading the engine in the background
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        await runner.cleanup()
        return 1
    log.info("worker pid %d listening on http://%s:%d", app[STATE].pid, config.host, config.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    waiter = asyncio.create_task(stop.wait())
    load_task = app[LOAD_TASK]
    await asyncio.wait({waiter, load_task}, return_when=asyncio.FIRST_COMPLETED)
    if load_task.done() and not load_task.cancelled() and load_task.exception() is not None:
        waiter.cancel()
        await runner.cleanup()
        log.error("exiting: the engine could not be loaded")
        return 1
    await waiter
    return await _drain(app, site, runner)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if stop.is_set():
        log.warning("%s again: already shutting down", sig.name)
        return
    log.info("%s received: shutting down", sig.name)
    stop.set()


async def _drain(app: web.Application, site: web.TCPSite, runner: web.AppRunner) -> int:
    """Stop accepting → let requests finish within drain_timeout → cut off the rest → close connections."""
    state = app[STATE]
    batcher = state.batcher
    state.status = "draining"  # /health says 503 and new generation requests get 503
    batcher.accepting = False
    await site.stop()  # close the listening socket; open connections keep being served
    log.info("draining: %d running, %d queued; waiting up to %.1fs", batcher.running, batcher.queue_depth,
             state.config.drain_timeout)
    if await batcher.wait_idle(state.config.drain_timeout):
        log.info("drained: every request finished")
    else:
        log.warning("drain deadline passed: cutting off %d running and %d queued requests", batcher.running,
                    batcher.queue_depth)
    await batcher.close()
    with contextlib.suppress(asyncio.CancelledError):
        await runner.cleanup()  # waits (shutdown_timeout) for handlers to write their last bytes
    log.info("stopped")
    return 0
