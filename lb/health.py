"""Health: active /health probes on an interval with their own timeout, thresholds, and passive mark-down.

A backend is dropped after `unhealthy_threshold` consecutive failed probes, or at once when a proxied request
finds its connection refused or reset; it returns after `healthy_threshold` good probes (a new backend
after its first). A probe that times out while the backend is still streaming responses does not count:
a busy worker is alive. Each good probe also refreshes the backend's models (/health or /v1/models).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp

from lb.backends import Backend, BackendPool

log = logging.getLogger("lb.health")


class ProbeFailed(Exception):
    """A worker did not answer /health with 200 in time; the message says why."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out  # slow rather than refused or wrong: a busy worker may be alive


class HealthChecker:
    def __init__(
        self,
        pool: BackendPool,
        session: aiohttp.ClientSession,
        *,
        interval: float,
        timeout: float,
        unhealthy_threshold: int,
        healthy_threshold: int,
    ) -> None:
        self._pool = pool
        self._session = session
        self.interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.batch_sizes: dict[str, int | None] = {}  # URL -> batch_size from its last /health

    async def run(self) -> None:
        """Probe every backend each interval until cancelled."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        backends = list(self._pool.backends)
        await asyncio.gather(*(self.check(b) for b in backends))

    async def check(self, backend: Backend) -> None:
        started = time.monotonic()
        try:
            models = await self.probe(backend.url)
        except ProbeFailed as exc:
            backend.last_check = time.time()
            busy = exc.timed_out and backend.last_progress >= started - self.interval
            if busy:
                return  # it is streaming to our clients right now: slow to answer, not dead
            self.record_failure(backend, str(exc))
        else:
            backend.last_check = time.time()
            backend.batch_size = self.batch_sizes.get(backend.url)
            self.record_success(backend, models)

    def record_success(self, backend: Backend, models: frozenset[str]) -> None:
        if backend.removed:
            return
        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        models_changed = bool(models) and models != backend.models
        if models_changed:
            backend.models = models
        if not backend.healthy and (
            not backend.ever_healthy or backend.consecutive_successes >= self.healthy_threshold
        ):
            log.info(
                "backend %d %s is healthy (models: %s)",
                backend.index,
                backend.url,
                ", ".join(sorted(backend.models)) or "?",
            )
            backend.ever_healthy = True
            self._pool.set_health(backend, True)
        elif models_changed:
            self._pool.changed()

    def record_failure(self, backend: Backend, reason: str) -> None:
        if backend.removed:
            return
        backend.consecutive_successes = 0
        backend.consecutive_failures += 1
        if backend.healthy and backend.consecutive_failures >= self.unhealthy_threshold:
            log.warning(
                "backend %d %s dropped after %d failed probes: %s",
                backend.index,
                backend.url,
                backend.consecutive_failures,
                reason,
            )
            self._pool.set_health(backend, False)
        if backend.discovered and backend.consecutive_failures >= self.unhealthy_threshold:
            log.info("backend %d %s forgotten: discovered, and gone (%s)", backend.index, backend.url, reason)
            self._pool.remove(backend)  # --discover adds it again if it comes back

    def mark_down(self, backend: Backend, reason: str) -> None:
        """Passive: a proxied request found the connection refused or reset, so stop routing to it now."""
        backend.consecutive_successes = 0
        backend.consecutive_failures = max(backend.consecutive_failures + 1, self.unhealthy_threshold)
        if backend.healthy:
            log.warning("backend %d %s marked down: %s", backend.index, backend.url, reason)
            self._pool.set_health(backend, False)

    async def probe(self, url: str) -> frozenset[str]:
        """GET /health (then /v1/models if /health names no model); the served models, or ProbeFailed."""
        return (await self.probe_body(url))[0]

    async def probe_body(self, url: str) -> tuple[frozenset[str], Any]:
        """`probe`, with the /health body too (discovery tells a worker from a balancer by it)."""
        body = await self._get_json(url + "/health")
        # the worker's current cap (lowered after running out of memory), else its configured batch size
        size = (body.get("batch_cap") or body.get("batch_size")) if isinstance(body, dict) else None
        self.batch_sizes[url] = size if isinstance(size, int) and size > 0 else None
        models = _models_from_health(body)
        if not models:
            try:
                models = _models_from_list(await self._get_json(url + "/v1/models"))
            except ProbeFailed:
                models = frozenset()  # healthy but does not say what it serves: route anything to it
        return models, body

    async def _get_json(self, url: str) -> Any:
        try:
            async with self._session.get(url, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise ProbeFailed(f"GET {url} answered {resp.status}")
                raw = await resp.read()
        except TimeoutError:
            raise ProbeFailed(f"GET {url} timed out", timed_out=True) from None
        except aiohttp.ClientError as exc:
            raise ProbeFailed(f"GET {url} failed: {exc.__class__.__name__}: {exc}") from None
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return {}  # a 200 with a non-JSON body is still alive


def _models_from_health(body: Any) -> frozenset[str]:
    if not isinstance(body, dict):
        return frozenset()
    names: list[Any] = []
    if isinstance(body.get("model"), str):
        names.append(body["model"])
    if isinstance(body.get("models"), list):
        names += body["models"]
    if isinstance(body.get("served_model_names"), list):
        names += body["served_model_names"]
    return frozenset(n for n in names if isinstance(n, str) and n)


def _models_from_list(body: Any) -> frozenset[str]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return frozenset()
    return frozenset(
        item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)
    )
