"""The proxy: auth, body, model routing, admission, then forward one attempt at a time and relay.

Hot path, in order: one header compare (auth), one body read (bodies up to 1 MiB are kept so an attempt
can be retried), the model read only when backends serve different models, a policy choice, one upstream
request over a pooled keep-alive connection (upstream.py), and the response relayed through the Exchange
(exchange.py): small complete bodies in one write, anything else (SSE, unknown length) chunk by chunk as it
arrives. Response bodies are never parsed. Entry points: `handle` (aiohttp route) and `forward` (front.py).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from lb.admission import Admission, is_bulk
from lb.aiohttp_server import check_request
from lb.auth import check_client
from lb.backends import Backend, BackendPool
from lb.config import BalancerConfig
from lb.errors import (
    BalancerError,
    GatewayTimeout,
    InvalidHttpRequest,
    RequestTimeout,
    ShuttingDown,
    UpstreamFailed,
    sse_error_event,
)
from lb.exchange import AiohttpExchange, Exchange, Reply
from lb.health import HealthChecker
from lb.http11 import worker_headers
from lb.intake import Intake
from lb.metrics import Metrics
from lb.model_routing import ModelRouter, rewrite_model, served_name
from lb.request_body import model_in, read_body
from lb.tracing import request_id
from lb.upstream import UpstreamClient, UpstreamError, UpstreamResponse, UpstreamTimeout
from lb.work import PLAIN, Work, parse_payload

log = logging.getLogger("lb.proxy")

# the endpoints that carry the traffic: plain aiohttp routes (dict lookup) and the lean front's whole remit
HOT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate")
RESPONSE_BUFFER_LIMIT = 1 << 20  # bytes: complete responses up to this are relayed in one write
RETRY_STATUSES = frozenset({429, 502, 503})  # a full, failing or draining worker answered before doing work
BUSY_STATUSES = frozenset({429, 503})  # with Retry-After: a full queue; routed around that long, not ejected
MAX_BUSY = 300.0  # seconds: the longest Retry-After honoured
NO_HEADERS: list[tuple[str, str]] = []


class _Retry:
    """An attempt failed before any byte reached the client; try another backend."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Proxy:
    def __init__(
        self,
        config: BalancerConfig,
        pool: BackendPool,
        admission: Admission,
        router: ModelRouter,
        health: HealthChecker,
        metrics: Metrics,
        client: UpstreamClient,
    ) -> None:
        self._pool = pool
        self._admission = admission
        self._router = router
        self._health = health
        self._metrics = metrics
        self._client = client
        self._keys = config.api_keys()
        self._worker_auth: tuple[tuple[bytes, bytes], ...] = (
            ((b"Authorization", b"Bearer " + config.worker_api_key.encode()),)
            if config.worker_api_key
            else ()
        )
        self._max_body = config.max_body_size
        self._body_timeout = config.body_timeout
        self._max_head = config.max_header_size
        self._max_retries = config.max_retries
        self.total_requests = 0
        self.draining = False  # shutdown began: new requests get 503 (lb/shutdown.py)
        self._streams: set[asyncio.Task[object]] = set()  # tasks relaying a stream right now
        self._cutting = False  # the drain deadline passed: a cancelled stream ends with an SSE error event
        self.streams_cut = 0
        # affinity, token load, rate limits, cache: None without them, so bodies stay unparsed
        self.intake = Intake(config, metrics) if Intake.wanted(config) else None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp route for every proxied path the lean front did not take."""
        started = time.perf_counter()
        exchange = AiohttpExchange(request)
        try:
            if not exchange.target:
                raise InvalidHttpRequest("The request target must be an origin-form path of visible ASCII.")
            check_request(request, self._max_head)
            self.check_key(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
            try:  # the whole body, before the request may take a worker slot
                async with asyncio.timeout(self._body_timeout):
                    body = await read_body(request, self._max_body)
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body did not arrive within {self._body_timeout:g}s."
                ) from None
        except BalancerError as exc:
            reply = self.refuse(exchange, exc)
        else:
            reply = await self.forward(exchange, body, started)
        assert reply is not None
        return reply

    async def forward(
        self, exchange: Exchange, body: bytes | AsyncIterator[bytes] | None, started: float
    ) -> Reply:
        """Route, admit and relay one authenticated request whose body was read (or is streaming)."""
        self.total_requests += 1
        try:
            if self.draining:
                raise ShuttingDown("The balancer is shutting down; send the request to another instance.")
            model = None
            work, extra, stored = PLAIN, NO_HEADERS, None
            if self.intake is not None:  # 400 bad JSON, 429 over the key's rate limits
                work, extra, stored, hit = self.intake.admit(exchange.target, exchange.raw_headers, body)
                if hit is not None:
                    status, worker_headers, data = hit
                    return exchange.respond(status, worker_headers, [("X-LB-Cache", "hit"), *extra], data)
            if self._router.needs_model and isinstance(body, bytes) and body:
                model = model_in(work.payload if work.payload is not None else parse_payload(body))
            candidates = self._router.candidates(model, self._pool.routable)  # raises ModelNotFound
            return await self._forward(exchange, body, model, candidates, started, work, extra, stored)
        except BalancerError as exc:
            self._metrics.rejected(exc.status)
            return exchange.fail(exc)

    def cut_streams(self) -> int:
        """The drain deadline: cancel every running stream; SSE streams end with an error event (see
        `_stream`), others are aborted. Returns how many were cut."""
        self._cutting = True
        streams = list(self._streams)
        for task in streams:
            task.cancel()
        return len(streams)

    def check_key(self, authorization: str | None, api_key: str | None = None) -> None:
        """With --api-key: the client's key as a bearer token or in X-API-Key."""
        if self._keys:
            check_client(authorization, api_key, self._keys)

    def refuse(self, exchange: Exchange, exc: BalancerError) -> Reply:
        """Answer a request the balancer turns down before routing (e.g. a bad key)."""
        self.rejected(exc)
        return exchange.fail(exc)

    def rejected(self, exc: BalancerError) -> None:
        """Count a request turned down before routing (the front answers malformed ones itself)."""
        self.total_requests += 1
        self._metrics.rejected(exc.status)

    def worker_headers(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """The headers a worker receives: the client's, less hop-by-hop ones and, when the balancer checked
        the client's key, its credentials; plus the balancer's own (the worker key)."""
        return worker_headers(
            exchange.raw_headers,
            drop_credentials=bool(self._keys or self._worker_auth),
            add=self._worker_auth,
        )

    async def _forward(
        self,
        exchange: Exchange,
        body: bytes | AsyncIterator[bytes] | None,
        model: str | None,
        candidates: Sequence[Backend],
        started: float,
        work: Work = PLAIN,
        extra: list[tuple[str, str]] = NO_HEADERS,
        stored: bytes | None = None,
    ) -> Reply:
        router, pool = self._router, self._pool

        def current() -> Sequence[Backend]:
            return router.candidates(model, pool.routable)

        if not candidates and pool.busy_for() is None:
            current = _empty  # known model, nobody healthy serving it: 503 from admission (unless resting)
        tried: frozenset[int] = frozenset()
        retries = 0
        headers = self.worker_headers(exchange)
        bulk = is_bulk(exchange.raw_headers)  # the client stepped aside: it waits behind interactive traffic
        rid = request_id(exchange.raw_headers)  # one id for every attempt, the client's when it sent one
        self._metrics.begin_trace(exchange.raw_headers, rid[0], exchange.target)
        if not rid[1]:
            headers.append((b"X-Request-ID", rid[0]))
        while True:
            backend = await self._admission.choose(current, tried, bulk=bulk, work=work)
            can_retry = (
                retries < self._max_retries
                and not isinstance(body, AsyncIterator)
                and any(b.index not in tried and b is not backend for b in current())
            )
            sent = body
            if (
                model is not None
                and isinstance(body, bytes)
                and backend.models
                and model not in backend.models
            ):
                sent = rewrite_model(body, served_name(backend, model))  # matched by normalised name
            async with pool.track(backend, bulk, work.tokens):
                outcome = await self._attempt(
                    exchange, backend, headers, sent, retries, can_retry, started, rid[0], extra, stored
                )
            if not isinstance(outcome, _Retry):
                return outcome
            log.info("retrying on another backend: backend %d %s", backend.index, outcome.reason)
            self._metrics.retried(backend)
            tried = tried | {backend.index}
            retries += 1

    async def _attempt(
        self,
        exchange: Exchange,
        backend: Backend,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None,
        retries: int,
        can_retry: bool,
        started: float,
        rid: bytes,
        extra: list[tuple[str, str]],
        stored: bytes | None,
    ) -> Reply | _Retry:
        self._metrics.overhead.observe(time.perf_counter() - started)
        try:
            upstream = await self._client.request(
                backend.host,
                backend.port,
                backend.tls,
                exchange.method,
                backend.base_path + exchange.target,
                headers,
                body,
            )
        except UpstreamError as exc:
            backend.errors += 1
            if isinstance(exc, UpstreamTimeout) and not exc.connect:
                raise GatewayTimeout(
                    f"Worker {backend.index} sent no response within the read timeout."
                ) from None
            # refused, reset or unreachable before any response byte: stop routing there, try elsewhere
            self._health.mark_down(backend, str(exc))
            if can_retry:
                return _Retry(str(exc))
            raise UpstreamFailed(f"Worker {backend.index} failed: {exc}") from None
        try:
            return await self._relay(
                exchange, backend, upstream, retries, can_retry, started, rid, extra, stored
            )
        finally:
            upstream.release()  # back to the pool if read to the end, else closed (the worker stops)

    async def _relay(
        self,
        exchange: Exchange,
        backend: Backend,
        upstream: UpstreamResponse,
        retries: int,
        can_retry: bool,
        started: float,
        rid: bytes,
        limits: list[tuple[str, str]],
        stored: bytes | None,
    ) -> Reply | _Retry:
        status = upstream.status
        if status in RETRY_STATUSES:
            rest = retry_after(upstream.headers) if status in BUSY_STATUSES else None
            if rest is not None:  # back-pressure, not failure: the worker stays healthy
                log.info("backend %d answered %d: busy for %.1fs", backend.index, status, rest)
                self._pool.set_busy(backend, rest)
                self._metrics.busy(backend)
            if can_retry:
                backend.errors += status != 429 and rest is None
                return _Retry(f"answered {status}")
        ttfb = time.perf_counter()
        extra = [
            ("X-LB-Worker", backend.label),
            ("X-LB-Retries", str(retries)),
            ("X-Request-ID", rid.decode("latin-1")),
            *limits,
        ]
        length = upstream.content_length
        is_sse = upstream.content_type.startswith("text/event-stream")
        if length is not None and length <= RESPONSE_BUFFER_LIMIT and not is_sse:
            try:
                data = await upstream.read()  # the worker produced it whole: one write to the client
            except UpstreamError as exc:
                backend.errors += 1
                self._health.mark_down(backend, f"{exc} (while reading the response)")
                raise UpstreamFailed(f"Worker {backend.index} failed mid-response.") from None
            backend.last_progress = time.monotonic()
            self._account(backend, status, started, ttfb)
            if stored is not None and status == 200 and self.intake is not None:
                self.intake.store(stored, (status, upstream.headers, data))
            return exchange.respond(status, upstream.headers, extra, data)
        await exchange.start(status, upstream.headers, extra, more_now=upstream.buffered)
        return await self._stream(exchange, backend, upstream, is_sse, started, ttfb)

    async def _stream(
        self,
        exchange: Exchange,
        backend: Backend,
        upstream: UpstreamResponse,
        is_sse: bool,
        started: float,
        ttfb: float,
    ) -> Reply:
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            async for chunk in upstream.chunks():
                backend.last_progress = time.monotonic()
                try:
                    if upstream.done:  # the last piece: send it with the end of the stream
                        reply = await exchange.end(chunk)
                        self._account(backend, upstream.status, started, ttfb)
                        return reply
                    await exchange.write(chunk)
                except ConnectionError:
                    # the client left between two chunks; release() closes upstream, so the worker stops
                    self._metrics.client_gone(backend)
                    return exchange.gone()
        except UpstreamError as exc:
            # the worker failed after bytes were sent: end the stream visibly instead of hanging or truncating
            backend.errors += 1
            self._metrics.stream_failed(backend)
            if not isinstance(exc, UpstreamTimeout):
                self._health.mark_down(backend, f"{exc} (mid-stream)")
            if not is_sse:
                log.warning("worker %d failed mid-response: %s", backend.index, exc)
                return exchange.abort()  # the client sees a truncated body, never a forged end
            await exchange.write(sse_error_event(f"Worker {backend.index} failed mid-stream: {exc}"))
            return await exchange.end()
        except asyncio.CancelledError:
            if not (self._cutting and is_sse):
                raise  # the client left, or a stream without events to end it: abort the connection
            task.uncancel()  # cut at the drain deadline: end the stream visibly, then let the front close
            self.streams_cut += 1
            message = "The balancer is shutting down and its drain deadline passed; this stream was cut."
            await exchange.write(sse_error_event(message, "service_unavailable", "shutting_down"))
            return await exchange.end()
        finally:
            self._streams.discard(task)
        reply = await exchange.end()
        self._account(backend, upstream.status, started, ttfb)
        return reply

    def _account(self, backend: Backend, status: int, started: float, ttfb: float) -> None:
        end = time.perf_counter()
        backend.requests_served += 1
        backend.status_counts[status] = backend.status_counts.get(status, 0) + 1
        if status >= 500:
            backend.errors += 1
        backend.latencies.append(end - started)
        self._metrics.observe(backend, status, ttfb - started, end - started)


def _empty() -> Sequence[Backend]:
    return ()


def retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    """Seconds from Retry-After (delta-seconds or an HTTP date), capped at MAX_BUSY; None if absent."""
    value = next((v.decode("latin-1") for k, v in headers if k.lower() == b"retry-after"), None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(seconds, MAX_BUSY) if seconds > 0 else None
