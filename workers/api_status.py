"""GET /health, /v1/models and /metrics: cheap reads of the worker's state, answered on the event loop."""

from __future__ import annotations

from aiohttp import web

from workers.gpu import cuda_visible_devices
from workers.state import STATE


async def health(request: web.Request) -> web.Response:
    """200 with the worker's identity and load when serving; 503 (same body) while loading or draining."""
    state = request.app[STATE]
    if state.batcher.failure and state.status == "ok":
        state.status, state.error = "failed", state.batcher.failure
    loaded = state.status in ("ok", "draining")  # before loading, the engine may not know its model yet
    info = state.engine.info if loaded else None
    body = {
        "status": state.status,
        "model": info.model if info else state.config.model_name,
        "engine": info.engine if info else state.config.engine,
        "device": info.device if info else state.config.device,
        "max_model_len": info.max_model_len if info else None,
        "cuda_visible_devices": cuda_visible_devices(),
        "gpu": state.gpu,
        "queue_depth": state.batcher.queue_depth,
        "running": state.batcher.running,
        "batch_size": state.config.batch_size,
        "batch_cap": state.batcher.cap.current(),  # below batch_size for a while after running out of memory
        "pid": state.pid,
    }
    if state.error:
        body["error"] = state.error
    if state.load is not None:  # the latest in-place model swap (POST /admin/load)
        body["load"] = state.load.as_dict()
    return web.json_response(body, status=200 if state.status == "ok" else 503)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    loaded = state.status in ("ok", "draining")
    name = state.engine.info.model if loaded else state.config.model_name
    card = {"id": name, "object": "model", "created": int(state.started_at), "owned_by": "inference-balancer",
            "root": state.config.model_path or name,
            "max_model_len": state.engine.info.max_model_len if loaded else None}
    return web.json_response({"object": "list", "data": [card]})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(body=state.metrics.render(), headers={"Content-Type": state.metrics.content_type})
