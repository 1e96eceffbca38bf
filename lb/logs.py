"""GET /logs/{component}?lines=N: the tail of a log file the launcher or SLURM job named with --log-file.

Only the components named there can be read: the name is a key into that table and never part of a path, so
`/logs/../../etc/passwd` and unknown names are 404s. Guarded like the admin API (token, or loopback only).
"""

from __future__ import annotations

import os

from aiohttp import web

from lb.auth import check_admin
from lb.errors import BadRequest, NotFound, answers_errors
from lb.state import STATE

DEFAULT_LINES = 200
MAX_LINES = 10_000
BLOCK = 64 * 1024  # bytes read at a time, from the end of the file backwards


def tail(path: str, lines: int) -> bytes:
    """The last `lines` lines of a file, reading only as much of its end as they need."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        position = f.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= lines:
            step = min(BLOCK, position)
            position -= step
            f.seek(position)
            data = f.read(step) + data
    if data.endswith(b"\n"):
        data = data[:-1]
    return b"\n".join(data.split(b"\n")[-lines:]) + b"\n" if data else b""


async def get_log(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_admin(request, state.config.admin_secret())
    component = request.match_info["component"]
    path = state.log_files.get(component)
    if path is None:
        known = ", ".join(sorted(state.log_files)) or "none (the balancer was started without --log-file)"
        raise NotFound(f"No log named {component!r}; known: {known}.", param="component")
    try:
        lines = int(request.query.get("lines", DEFAULT_LINES))
    except ValueError:
        raise BadRequest("'lines' must be an integer.", param="lines") from None
    if not 1 <= lines <= MAX_LINES:
        raise BadRequest(f"'lines' must be between 1 and {MAX_LINES}.", param="lines")
    try:
        body = tail(path, lines)
    except FileNotFoundError:
        raise NotFound(f"The {component} log {path} does not exist (yet).", param="component") from None
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def list_logs(request: web.Request) -> web.Response:
    check_admin(request, request.app[STATE].config.admin_secret())
    return web.json_response({"components": sorted(request.app[STATE].log_files)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/logs", answers_errors(list_logs))
    app.router.add_get("/logs/{component}", answers_errors(get_log))
