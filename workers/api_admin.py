"""POST /admin/load (swap the model in place) and GET /admin/load (the latest swap), admin-guarded.

The guard is the balancer's admin rule: with --admin-token the bearer must match it; without one only
loopback clients may call. POST answers 202 at once with the swap's record (poll /health, whose `load` field
carries it, or pass `?wait=1` to get the outcome: 200 loaded, 500 failed with the reason while the old model
serves again). A bad path or option is a 400 before anything stops; a swap while another runs is a 409.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json

from aiohttp import web

from workers import swap
from workers.errors import APIError, InvalidRequest
from workers.state import STATE


class Unauthorized(APIError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_admin_token"


class Forbidden(APIError):
    status = 403
    error_type = "permission_error"
    code = "forbidden"


class SwapConflict(APIError):
    status = 409
    error_type = "invalid_request_error"
    code = "swap_in_progress"


class SwapFailed(APIError):
    status = 500
    error_type = "server_error"
    code = "model_load_failed"


def check_admin(request: web.Request, token: str | None) -> None:
    """With a token: `Authorization: Bearer <token>` (constant-time compare). Without: loopback only."""
    if token is not None:
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("POST /admin/load needs 'Authorization: Bearer <admin token>'")
        return
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Forbidden("the worker's admin API answers loopback clients only unless --admin-token is set")


async def load(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_admin(request, state.config.admin_token)
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        raise InvalidRequest('the body must be JSON like {"model_path": "/path/to/model"}') from None
    try:
        record, task = swap.begin(state, body)
    except swap.SwapRefused as exc:
        raise InvalidRequest(str(exc), code="invalid_model") from None
    except swap.SwapBusy as exc:
        raise SwapConflict(str(exc)) from None
    if request.query.get("wait") not in ("1", "true"):
        return web.json_response(record.as_dict(), status=202)
    await asyncio.shield(task)  # a client that leaves does not stop the swap
    if record.state == "failed":
        raise SwapFailed(f"{record.model} did not load: {record.error}; serving {state.config.model_name} "
                         "again")
    return web.json_response(record.as_dict())


async def latest(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_admin(request, state.config.admin_token)
    return web.json_response(state.load.as_dict() if state.load else None)
