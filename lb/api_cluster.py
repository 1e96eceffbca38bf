"""GET /cluster (the dashboard's one document), GET /dashboard (the page), GET /config, and the dashboard's
buttons: POST /workers/{index}/drain and /workers/{index}/readmit.

/cluster joins what the pool knows now (health, draining, in-flight) with what the telemetry gatherer read
in its last background round; answering it never waits on a worker.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from lb.errors import answers_errors
from lb.latency import WindowStats
from lb.state import STATE, BalancerState
from lb.telemetry import RECENT_SECONDS, WorkerTelemetry

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
SECRET_WORDS = ("key", "token", "secret", "password")  # a setting whose name holds one of these is masked
MASK = "********"


def worker_state(healthy: bool, draining: bool) -> str:
    """The dashboard's colour: draining (admin) wins over health, so a drained worker never looks down."""
    if draining:
        return "draining"
    return "healthy" if healthy else "down"


def cluster_document(state: BalancerState) -> dict[str, Any]:
    """Everything but the charts' history, which `get_cluster` splices in (serialised once per round)."""
    telemetry = state.telemetry
    overall = telemetry.overall
    workers = []
    for b in state.pool.backends:
        seen = telemetry.workers.get(b.index) or WorkerTelemetry()
        workers.append(
            {
                "index": b.index,
                "url": b.url,
                "state": worker_state(b.healthy, b.draining),
                "healthy": b.healthy,
                "draining": b.draining,
                "models": sorted(b.models),
                "in_flight": b.in_flight,
                "requests_served": b.requests_served,
                "errors": b.errors,
                "retries": state.metrics.retries.get(b.index, 0),
                "last_check": b.last_check,
                "consecutive_failures": b.consecutive_failures,
                "engine": {
                    "running": seen.running,
                    "waiting": seen.waiting,
                    "kv_cache_usage": seen.kv_cache_usage,
                    "generated_tokens": seen.generated_tokens,
                    "tokens_per_s": seen.tokens_per_s,
                    "ttft_ms": seen.ttft_ms,
                },
                "recent": _window(seen.recent),
                "telemetry_at": seen.fetched_at,
                "telemetry_error": seen.error,
                "gpu": seen.gpu,
                "system": seen.system,
            }
        )
    history = telemetry.history
    return {
        "time": time.time(),
        "uptime_s": round(time.monotonic() - state.started, 3),
        "policy": state.config.policy,
        "telemetry_interval_s": telemetry.interval,
        "recent_window_s": RECENT_SECONDS,
        "balancer": {
            "total_workers": len(state.pool.backends),
            "healthy_workers": sum(1 for b in state.pool.backends if b.healthy),
            "in_flight": state.pool.total_in_flight,
            "queue_depth": state.admission.depth,
            "total_requests": state.proxy.total_requests,
            "requests_per_s": history[-1].requests_per_s if history else 0.0,
            "tokens_per_s": history[-1].tokens_per_s if history else 0.0,
            "retries": sum(state.metrics.retries.values()),
            "rejected": sum(state.metrics.rejections.values()),
            "recent": _window(overall),
        },
        "workers": workers,
        "jobs": telemetry.work,
    }


def _window(stats: WindowStats | None) -> dict[str, Any]:
    if stats is None:
        return {
            "requests": 0,
            "errors": 0,
            "latency_ms_p50": None,
            "latency_ms_p99": None,
            "ttfb_ms_p50": None,
        }
    return dataclasses.asdict(stats)


def masked_config(state: BalancerState) -> dict[str, Any]:
    """The running configuration; every secret-looking value replaced by a mask (its presence still shows)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(state.config):
        value = getattr(state.config, field.name)
        secret = any(word in field.name for word in SECRET_WORDS) and not field.name.endswith("_file")
        if secret and value:
            value = [MASK] * len(value) if isinstance(value, tuple) else MASK
        out[field.name] = list(value) if isinstance(value, tuple) else value
    out["api_keys_loaded"] = len(state.config.api_keys())
    return out


async def get_cluster(request: web.Request) -> web.Response:
    state = request.app[STATE]
    live = json.dumps(cluster_document(state))
    body = f'{live[:-1]}, "history": {state.telemetry.history_json}}}'
    return web.Response(text=body, content_type="application/json", headers={"Cache-Control": "no-store"})


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(masked_config(request.app[STATE]))


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(DASHBOARD_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def drain_worker(request: web.Request) -> web.StreamResponse:
    return await request.app[STATE].admin.set_draining(request, True)


async def readmit_worker(request: web.Request) -> web.StreamResponse:
    return await request.app[STATE].admin.set_draining(request, False)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/cluster", get_cluster)
    app.router.add_get("/config", get_config)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_static("/dashboard/static", DASHBOARD_DIR, append_version=False)
    app.router.add_post("/workers/{index}/drain", answers_errors(drain_worker))
    app.router.add_post("/workers/{index}/readmit", answers_errors(readmit_worker))
