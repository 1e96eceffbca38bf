"""The balancer's own routes: /health, /livez, /stats, /metrics, /v1/models, worker admin, 404 catch-all."""

from __future__ import annotations

from aiohttp import web

from lb.errors import BalancerError, NotFound, answers_errors, error_response
from lb.proxy import HOT_PATHS
from lb.state import STATE
from lb.stats import backend_stats, health, stats


async def proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[STATE].proxy.handle(request)


async def balancer_health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    status, body = health(state.pool, state.draining)
    return web.json_response(body, status=status)


async def liveness(request: web.Request) -> web.Response:
    """200 while the process serves HTTP at all, draining included: restart it only when this fails.
    `/health` is the readiness probe (503 while draining or with no healthy worker)."""
    return web.json_response({"status": "alive", "draining": request.app[STATE].draining})


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = stats(
        state.pool,
        policy=state.config.policy,
        total_requests=state.proxy.total_requests,
        started=state.started,
        queue_depth=state.admission.depth,
    )
    body["batches"] = state.batches.running()  # batches being dispatched, with their progress
    latest = state.switcher.latest  # the latest rolling model switch, step by step
    body["model_switch"] = latest.as_dict() if latest else None
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def list_models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        # a /v1 path: same keys as the proxy
        state.proxy.check_key(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
    except BalancerError as exc:
        return error_response(exc)
    models = state.pool.models()
    if not models:
        return await proxy(request)  # workers that do not announce their models: ask one of them
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "inference-balancer"} for m in models]
    return web.json_response({"object": "list", "data": data})


async def list_workers(request: web.Request) -> web.Response:
    return web.json_response([backend_stats(b) for b in request.app[STATE].pool.backends])


async def add_worker(request: web.Request) -> web.StreamResponse:
    return await request.app[STATE].admin.add_worker(request)


async def remove_worker(request: web.Request) -> web.StreamResponse:
    return await request.app[STATE].admin.remove_worker(request)


async def not_found(request: web.Request) -> web.Response:
    return error_response(NotFound(f"Unknown path: {request.method} {request.path}"))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", balancer_health)
    app.router.add_get("/livez", liveness)
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/workers", answers_errors(add_worker))
    app.router.add_delete("/workers/{index}", answers_errors(remove_worker))
    app.router.add_get("/workers", list_workers)
    for path in HOT_PATHS:  # plain routes resolve by dict lookup, before the regex of the catch-all below
        app.router.add_route("*", path, proxy)


def add_catch_all(app: web.Application) -> None:
    """Last: any other /v1 path goes to a worker, anything else is a 404 with an OpenAI-style body."""
    app.router.add_route("*", "/v1/{tail:.*}", proxy)
    app.router.add_route("*", "/{tail:.*}", not_found)
