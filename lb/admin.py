"""Admin API: POST /workers probes a worker, then adds it; DELETE /workers/{index} drains, then removes."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from lb.auth import check_admin
from lb.backends import Backend, BackendPool
from lb.errors import BadRequest, BalancerError, NotFound
from lb.health import HealthChecker, ProbeFailed
from lb.stats import backend_stats

log = logging.getLogger("lb.admin")
DRAIN_POLL = 0.05  # seconds between in-flight checks while draining


class WorkerUnreachable(BalancerError):
    status = 502
    type = "upstream_error"
    code = "worker_unreachable"


class Admin:
    def __init__(
        self, pool: BackendPool, health: HealthChecker, admin_token: str | None, drain_timeout: float
    ) -> None:
        self._pool = pool
        self._health = health
        self._token = admin_token
        self._drain_timeout = drain_timeout

    async def add_worker(self, request: web.Request) -> web.Response:
        check_admin(request, self._token)
        try:
            payload: Any = json.loads(await request.read())
        except ValueError:
            raise BadRequest('The body must be JSON like {"url": "http://host:port"}.') from None
        url = payload.get("url") if isinstance(payload, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BadRequest("'url' must be an http(s) URL.", param="url")
        weight = payload.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1000:
            raise BadRequest("'weight' must be a number > 0 and <= 1000.", param="weight")
        url = url.rstrip("/")
        existing = self._pool.find_url(url)
        if existing is not None and not existing.draining:
            return web.json_response(backend_stats(existing), status=200)
        try:
            models = await self._health.probe(url)
        except ProbeFailed as exc:
            raise WorkerUnreachable(f"Not added: {exc}", param="url") from None
        backend = self._pool.add(url, models, float(weight))
        backend.ever_healthy = True
        backend.consecutive_successes = 1
        self._pool.set_health(backend, True)
        log.info(
            "backend %d %s added (weight %g, models: %s)",
            backend.index,
            url,
            backend.weight,
            ", ".join(sorted(models)) or "?",
        )
        return web.json_response(backend_stats(backend), status=201)

    async def remove_worker(self, request: web.Request) -> web.Response:
        check_admin(request, self._token)
        backend = self._backend(request)
        index = backend.index
        drained = await self.drain(backend)
        self._pool.remove(backend)
        log.info(
            "backend %d %s removed (%s)", index, backend.url, "drained" if drained else "drain timed out"
        )
        body = backend_stats(backend) | {"drained": drained}
        return web.json_response(body)

    async def set_draining(self, request: web.Request, draining: bool) -> web.Response:
        """POST /workers/{index}/drain or /readmit: stop or resume routing new requests to a worker that
        stays in the pool (its in-flight requests finish either way)."""
        check_admin(request, self._token)
        backend = self._backend(request)
        if backend.draining != draining:
            backend.draining = draining
            self._pool.changed()
            log.info(
                "backend %d %s %s", backend.index, backend.url, "draining" if draining else "re-admitted"
            )
        return web.json_response(backend_stats(backend))

    def _backend(self, request: web.Request) -> Backend:
        try:
            index = int(request.match_info["index"])
        except ValueError:
            raise BadRequest("The worker index must be an integer.", param="index") from None
        backend = self._pool.get(index)
        if backend is None:
            raise NotFound(f"No worker with index {index}.", param="index")
        return backend

    async def drain(self, backend: Backend) -> bool:
        """Stop routing to `backend` and wait until its in-flight requests end; False on --drain-timeout."""
        backend.draining = True
        self._pool.changed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout
        while backend.in_flight > 0 or backend.reserved > 0:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(DRAIN_POLL)
        return True
