"""Send one request the balancer makes itself (a batch line, a /solve call) through admission, policy and
the upstream client, with retries on another worker; the whole response is read before anything is recorded.

Retryable, because no result was kept: the worker could not be reached, died before or while answering, or
answered 5xx or 429. A 4xx is the request's own fault and is returned as is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lb.admission import Admission
from lb.backends import Backend, BackendPool
from lb.errors import BalancerError, NoHealthyBackend
from lb.health import HealthChecker
from lb.metrics import Metrics
from lb.model_routing import ModelRouter, served_name
from lb.proxy import BUSY_STATUSES, retry_after
from lb.upstream import UpstreamClient, UpstreamError, UpstreamTimeout

log = logging.getLogger("lb.jobs")
HEADERS = [(b"Content-Type", b"application/json"), (b"Accept", b"application/json")]
RETRY_PAUSE = 0.2  # seconds before a retry that has to reuse a worker it already tried (the only one left)


@dataclass
class Outcome:
    """What one request came to: the worker's status and JSON body, or a failure with no response."""

    status: int | None  # None: no worker answered (every attempt failed)
    body: Any  # the worker's JSON (or the raw text when it was not JSON); an error dict when status is None
    attempts: int
    worker: int | None = None  # the backend index that answered

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Sender:
    def __init__(
        self,
        pool: BackendPool,
        router: ModelRouter,
        admission: Admission,
        health: HealthChecker,
        metrics: Metrics,
        client: UpstreamClient,
        retries: int,
    ) -> None:
        self._pool = pool
        self._router = router
        self._admission = admission
        self._health = health
        self._metrics = metrics
        self._client = client
        self.retries = retries

    def candidates(self, model: str | None) -> Sequence[Backend]:
        """Routable backends serving `model`; raises ModelNotFound when no backend ever served it."""
        return self._router.candidates(model, self._pool.routable)

    async def acquire(
        self, model: str | None, exclude: frozenset[int], *, bulk: bool, patient: bool
    ) -> Backend:
        """An admitted backend, already counted in flight: the caller must `self.release(backend, bulk)`."""
        router, pool = self._router, self._pool
        backend = await self._admission.choose(
            lambda: router.candidates(model, pool.routable), exclude, bulk=bulk, patient=patient
        )
        backend.in_flight += 1  # pool.track's increment, in the loop step of the grant
        backend.bulk_in_flight += bulk
        return backend

    def release(self, backend: Backend, bulk: bool) -> None:
        self._pool.release(backend, bulk)

    async def send(
        self,
        path: str,
        body: dict[str, Any],
        *,
        bulk: bool,
        patient: bool,
        first: Backend | None = None,
    ) -> Outcome:
        """POST `body` to `path`, retrying up to `retries` times; `first` is a backend already acquired.

        Raises BalancerError only when admission refuses (no worker serves the model, the queue is full).
        """
        model = body.get("model") if isinstance(body.get("model"), str) else None
        tried: set[int] = set()
        attempt = 0
        backend = first
        while True:
            if backend is None:
                backend = await self._acquire_untried(model, tried, bulk=bulk, patient=patient)
            try:
                outcome = await self._attempt(backend, path, body, model)
            finally:
                self.release(backend, bulk)
            outcome.attempts = attempt + 1
            retryable = outcome.status is None or outcome.status == 429 or outcome.status >= 500
            if not retryable or attempt >= self.retries:
                return outcome
            log.info(
                "retrying %s on another worker: worker %d gave %s",
                path,
                backend.index,
                outcome.status or outcome.body.get("message"),
            )
            self._metrics.retried(backend)
            tried.add(backend.index)
            attempt += 1
            backend = None

    async def _acquire_untried(
        self, model: str | None, tried: set[int], *, bulk: bool, patient: bool
    ) -> Backend:
        """Another worker than those tried; the same one again (after a pause) if it is the only one left."""
        while True:
            try:
                current = self.candidates(model)
                untried = any(b.index not in tried for b in current)
                if not untried:
                    await asyncio.sleep(RETRY_PAUSE)
                return await self.acquire(
                    model, frozenset(tried) if untried else frozenset(), bulk=bulk, patient=patient
                )
            except NoHealthyBackend:
                if not patient:
                    raise
                await asyncio.sleep(RETRY_PAUSE * 5)  # every worker is down: wait for one to come back

    async def _attempt(self, backend: Backend, path: str, body: dict[str, Any], model: str | None) -> Outcome:
        if model is not None and backend.models and model not in backend.models:
            body = {**body, "model": served_name(backend, model)}  # matched by normalised name
        payload = json.dumps(body).encode()
        started = time.perf_counter()
        try:
            upstream = await self._client.request(
                backend.host, backend.port, backend.tls, "POST", backend.base_path + path, HEADERS, payload
            )
            try:
                ttfb = time.perf_counter()
                data = await upstream.read()
            finally:
                upstream.release()
        except UpstreamError as exc:
            backend.errors += 1
            if not isinstance(exc, UpstreamTimeout) or exc.connect:
                self._health.mark_down(backend, str(exc))
            return Outcome(None, {"code": "worker_failed", "message": f"Worker {backend.index}: {exc}"}, 0)
        status = upstream.status
        rest = retry_after(upstream.headers) if status in BUSY_STATUSES else None
        if rest is not None:  # back-pressure: route around the worker that long, as the proxy does
            self._pool.set_busy(backend, rest)
        end = time.perf_counter()
        backend.requests_served += 1
        backend.status_counts[status] = backend.status_counts.get(status, 0) + 1
        backend.last_progress = time.monotonic()
        backend.latencies.append(end - started)
        self._metrics.observe(backend, status, ttfb - started, end - started)
        try:
            parsed: Any = json.loads(data) if data else None
        except ValueError:
            parsed = data.decode("utf-8", "replace")
        return Outcome(status, parsed, 0, backend.index)


def refusal(exc: BalancerError) -> tuple[int, dict[str, Any]]:
    """An admission refusal as (status, OpenAI error body), for callers that answer with a tuple."""
    return exc.status, {
        "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    }
