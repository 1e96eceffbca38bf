"""The checkpoint registry's routes: GET /models, POST /models/register, POST /models/set_active,
GET /models/active. Writes follow the admin rule (--admin-token, or loopback only without one).

`set_active` answers 202 with the rollout at once (progress: GET /models/active and /stats); `?wait=1` answers
when it ends: 200 done, or 502 with the failing worker's reason.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from lb.auth import check_admin
from lb.backends import Backend
from lb.errors import BadRequest, answers_errors
from lb.registry import check_loadable, parse_checkpoint
from lb.rollout import SwitchFailed
from lb.state import STATE


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError:
        raise BadRequest("The body must be JSON.") from None


def _serving(backends: list[Backend], model: str) -> list[int]:
    return [b.index for b in backends if model in b.models]


async def list_checkpoints(request: web.Request) -> web.Response:
    state = request.app[STATE]
    backends = [b for b in state.pool.backends if not b.removed]
    data = [c.as_dict() | {"workers": _serving(backends, c.id)} for c in state.switcher.registry.all()]
    return web.json_response({"object": "list", "data": data})


async def register(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_admin(request, state.config.admin_secret())
    checkpoint = parse_checkpoint(await _json(request))
    check_loadable(checkpoint)
    state.switcher.registry.add(checkpoint)
    return web.json_response(checkpoint.as_dict() | {"workers": []}, status=201)


async def set_active(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_admin(request, state.config.admin_secret())
    payload = await _json(request)
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
        raise BadRequest('The body must be JSON like {"id": "step-1000", "workers": [0, 1]}.', param="id")
    checkpoint = state.switcher.registry.get(payload["id"])  # 404 when unknown
    backends = _chosen(state.pool.backends, payload.get("workers"))
    rollout = state.switcher.start(checkpoint, backends)  # 409 while another runs
    if request.query.get("wait") not in ("1", "true"):
        return web.json_response(rollout.as_dict(), status=202)
    assert state.switcher.task is not None
    await asyncio.shield(state.switcher.task)
    if rollout.state == "failed":
        raise SwitchFailed(f"The switch to '{checkpoint.id}' stopped: {rollout.error}")
    return web.json_response(rollout.as_dict())


def _chosen(backends: list[Backend], indexes: Any) -> list[Backend]:
    live = [b for b in backends if not b.removed]
    if indexes is None:
        if not live:
            raise BadRequest("The balancer has no workers to switch.", param="workers")
        return live
    if not isinstance(indexes, list) or not indexes or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in indexes
    ):
        raise BadRequest("'workers' must be a non-empty list of worker indexes (see /stats).",
                         param="workers")
    by_index = {b.index: b for b in live}
    unknown = [i for i in indexes if i not in by_index]
    if unknown:
        raise BadRequest(f"No worker with index {unknown[0]} (known: {sorted(by_index)}).", param="workers")
    return [by_index[i] for i in dict.fromkeys(indexes)]


async def active(request: web.Request) -> web.Response:
    state = request.app[STATE]
    backends = [b for b in state.pool.backends if not b.removed]
    registered = {c.id for c in state.switcher.registry.all()}
    models = sorted({m for b in backends for m in b.models})
    body = {
        "active": [{"id": m, "registered": m in registered, "workers": _serving(backends, m)}
                   for m in models],
        "redirects": state.switcher.registry.redirects(),
        "switch": state.switcher.latest.as_dict() if state.switcher.latest else None,
    }
    return web.json_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/models", answers_errors(list_checkpoints))
    app.router.add_post("/models/register", answers_errors(register))
    app.router.add_post("/models/set_active", answers_errors(set_active))
    app.router.add_get("/models/active", answers_errors(active))
