"""GET /gpu, GET /system, GET/POST /settings/power_profile: what the worker's machine is doing.

NVML and psutil calls run on a thread, so a slow driver never stalls the event loop that serves generation.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from workers.errors import APIError, InvalidRequest
from workers.state import STATE
from workers.telemetry import POWER_PROFILES, GpuUnavailable, TelemetryCollector, system_stats


class GpuNotAvailable(APIError):
    status = 503
    error_type = "service_unavailable"
    code = "gpu_unavailable"


class NeedsRoot(APIError):
    status = 403
    error_type = "permission_error"
    code = "needs_root"


async def gpu(request: web.Request) -> web.Response:
    """Every GPU this worker may use, or `{"available": false, "reason"}`: always 200, it is a report."""
    return web.json_response(await asyncio.to_thread(request.app[STATE].gpus.read))


async def system(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(system_stats, request.app[STATE].cpu))


async def get_power_profile(request: web.Request) -> web.Response:
    reader = request.app[STATE].gpus
    report = await asyncio.to_thread(reader.read)
    body = {"profile": reader.profile, "profiles": list(POWER_PROFILES), "available": report["available"]}
    if not report["available"]:
        body["reason"] = report["reason"]
    else:
        body["power_limit_w"] = [g["power_limit_w"] for g in report["gpus"]]
    return web.json_response(body)


async def set_power_profile(request: web.Request) -> web.Response:
    """{"profile": "quiet" | "normal" | "max"}: the GPUs' NVML power limit (lowest, default, highest)."""
    try:
        payload = json.loads(await request.read())
    except ValueError:
        raise InvalidRequest('The body must be JSON like {"profile": "quiet"}.') from None
    profile = payload.get("profile") if isinstance(payload, dict) else None
    if profile not in POWER_PROFILES:
        raise InvalidRequest(f"'profile' must be one of {', '.join(POWER_PROFILES)}.", param="profile")
    try:
        result = await asyncio.to_thread(request.app[STATE].gpus.set_power_profile, profile)
    except GpuUnavailable as exc:
        raise GpuNotAvailable(f"No power profile without a GPU: {exc}") from None
    except PermissionError as exc:
        raise NeedsRoot(str(exc)) from None
    return web.json_response(result)


def add_routes(app: web.Application) -> None:
    """The routes, and the same figures as gauges on the worker's /metrics."""
    state = app[STATE]
    state.metrics.registry.register(TelemetryCollector(state.gpus, state.cpu))
    app.router.add_get("/gpu", gpu)
    app.router.add_get("/system", system)
    app.router.add_get("/settings/power_profile", get_power_profile)
    app.router.add_post("/settings/power_profile", set_power_profile)
