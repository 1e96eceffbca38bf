"""OpenAI Batches routes: POST/GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from lb.errors import answers_errors
from lb.jobs.api_files import int_param
from lb.jobs.auth import owner_of
from lb.jobs.errors import InvalidJobRequest
from lb.state import STATE


async def create(request: web.Request) -> web.Response:
    service = request.app[STATE].batches
    owner = owner_of(request)
    try:
        body: Any = json.loads(await request.read())
    except ValueError:
        raise InvalidJobRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidJobRequest("The request body must be a JSON object.", code="invalid_json")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            raise InvalidJobRequest(
                f"'{name}' is required and must be a string.", code="missing_required_parameter", param=name
            )
    batch = await service.create(
        owner, body["input_file_id"], body["endpoint"], body["completion_window"], body.get("metadata")
    )
    return web.json_response(batch)


async def list_batches(request: web.Request) -> web.Response:
    service = request.app[STATE].batches
    owner = owner_of(request)
    data, has_more = service.page(owner, request.query.get("after"), int_param(request, "limit", 20, 100))
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


async def retrieve(request: web.Request) -> web.Response:
    service = request.app[STATE].batches
    return web.json_response(service.retrieve(request.match_info["batch_id"], owner_of(request)))


async def cancel(request: web.Request) -> web.Response:
    service = request.app[STATE].batches
    batch_id = request.match_info["batch_id"]
    service.retrieve(batch_id, owner_of(request))  # 404 for another key's batch
    return web.json_response(await service.cancel(batch_id))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/batches", answers_errors(create))
    app.router.add_get("/v1/batches", answers_errors(list_batches))
    app.router.add_get("/v1/batches/{batch_id}", answers_errors(retrieve))
    app.router.add_post("/v1/batches/{batch_id}/cancel", answers_errors(cancel))
