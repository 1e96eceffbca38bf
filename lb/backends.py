"""Backend (the handle on one worker) and BackendPool (all backends, the routable view, in-flight counts)."""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

from yarl import URL

from lb.errors import NoHealthyBackend, WorkersBusy

LATENCY_WINDOW = 256  # recent request latencies kept per backend for /stats' p50


class Backend:
    """One worker: URL, health state, exact in-flight count and counters. Mutated only on the event loop."""

    __slots__ = (
        "base_path",
        "batch_size",
        "bulk_in_flight",
        "bulk_reserved",
        "busy_until",
        "consecutive_failures",
        "consecutive_successes",
        "discovered",
        "draining",
        "errors",
        "ever_healthy",
        "hash",
        "healthy",
        "host",
        "in_flight",
        "index",
        "label",
        "last_check",
        "last_progress",
        "latencies",
        "models",
        "port",
        "removed",
        "requests_served",
        "reserved",
        "status_counts",
        "tls",
        "tokens_in_flight",
        "url",
        "weight",
    )

    def __init__(
        self, index: int, url: str, models: frozenset[str] = frozenset(), weight: float = 1.0
    ) -> None:
        self.index = index
        self.label = str(index)  # X-LB-Worker header value
        self.url = url
        parsed = URL(url)
        self.host = parsed.host or "127.0.0.1"
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.tls = parsed.scheme == "https"
        self.base_path = parsed.raw_path.rstrip("/")  # a worker mounted under a prefix: prepended to paths
        self.healthy = False  # until the first good probe
        self.ever_healthy = False  # once dropped, a backend needs --healthy-threshold good probes to return
        self.draining = False  # admin removal in progress: no new requests
        self.removed = False
        self.in_flight = 0
        self.tokens_in_flight = 0  # estimated tokens (lb/work.py) of the requests in flight
        self.weight = weight  # relative capacity: every policy gives it weight-proportional work
        self.busy_until = 0.0  # monotonic time until which the worker asked (429/503 + Retry-After) for rest
        self.discovered = False  # found by --discover (forgotten when its probes fail), not configured
        # 64 stable bits of the URL: rendezvous hashing scores (policies.py) survive restarts and balancers
        self.hash = int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big")
        self.reserved = 0  # queue grants handed out but not yet tracked (see Admission)
        self.batch_size: int | None = None  # the worker's own batch size, from its /health (sizes bulk)
        self.bulk_in_flight = 0  # of in_flight, those in the bulk class (batch lines; capped per backend)
        self.bulk_reserved = 0
        self.requests_served = 0
        self.errors = 0
        self.status_counts: dict[int, int] = {}  # HTTP status -> responses relayed from this backend
        self.models = models
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.last_check: float | None = None  # wall-clock time of the last probe
        self.last_progress = 0.0  # monotonic time this backend last sent response bytes
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)  # seconds

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining and not self.busy_until

    def latency_ms_p50(self) -> float | None:
        return round(statistics.median(self.latencies) * 1000, 3) if self.latencies else None

    def __repr__(self) -> str:
        return f"Backend({self.index}, {self.url!r}, healthy={self.healthy}, in_flight={self.in_flight})"


class Tracked:
    """`async with pool.track(backend)`: counts one in-flight request and always releases it on exit."""

    __slots__ = ("_backend", "_bulk", "_pool", "_tokens")

    def __init__(self, pool: BackendPool, backend: Backend, bulk: bool = False, tokens: int = 0) -> None:
        self._pool = pool
        self._backend = backend
        self._bulk = bulk
        self._tokens = tokens

    async def __aenter__(self) -> Backend:
        # no await before the increment: a policy's choice and the count change happen in one loop step
        self._backend.in_flight += 1
        self._backend.bulk_in_flight += self._bulk
        self._backend.tokens_in_flight += self._tokens
        return self._backend

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._pool.release(self._backend, self._bulk, self._tokens)


class BackendPool:
    """All known backends by stable index; `routable` is rebuilt only when health or membership changes."""

    def __init__(self) -> None:
        self.backends: list[Backend] = []
        self.routable: list[Backend] = []
        self._next_index = 0
        self._release_listeners: list[Callable[[Backend], None]] = []
        self._change_listeners: list[Callable[[], None]] = []

    def add(self, url: str, models: frozenset[str] = frozenset(), weight: float = 1.0) -> Backend:
        backend = Backend(self._next_index, url, models, weight)
        self._next_index += 1
        self.backends.append(backend)
        self.changed()
        return backend

    def remove(self, backend: Backend) -> None:
        backend.removed = True
        backend.healthy = False
        if backend in self.backends:
            self.backends.remove(backend)
        self.changed()

    def get(self, index: int) -> Backend | None:
        for backend in self.backends:
            if backend.index == index:
                return backend
        return None

    def find_url(self, url: str) -> Backend | None:
        return next((b for b in self.backends if b.url == url), None)

    def track(self, backend: Backend, bulk: bool = False, tokens: int = 0) -> Tracked:
        """Count one request (and its estimated `tokens`) in flight on `backend` until the block exits."""
        return Tracked(self, backend, bulk, tokens)

    def release(self, backend: Backend, bulk: bool = False, tokens: int = 0) -> None:
        backend.in_flight -= 1
        backend.bulk_in_flight -= bulk
        backend.tokens_in_flight -= tokens
        for listener in self._release_listeners:
            listener(backend)

    def set_health(self, backend: Backend, healthy: bool) -> None:
        if backend.healthy != healthy:
            backend.healthy = healthy
            self.changed()

    def set_busy(self, backend: Backend, seconds: float) -> None:
        """A 429/503 with Retry-After: route around the worker for `seconds`; its health is untouched."""
        until = time.monotonic() + seconds
        if until <= backend.busy_until:
            return
        already = bool(backend.busy_until)
        backend.busy_until = until
        if not already:  # a running timer re-arms itself for an extension
            asyncio.get_running_loop().call_later(seconds, self._end_busy, backend)
            self.changed()

    def _end_busy(self, backend: Backend) -> None:
        if not backend.busy_until:
            return
        left = backend.busy_until - time.monotonic()
        if left > 1e-3:  # extended by a later Retry-After (or the timer fired early): wait for the rest
            asyncio.get_running_loop().call_later(left, self._end_busy, backend)
            return
        backend.busy_until = 0.0
        self.changed()

    def busy_for(self, exclude: frozenset[int] = frozenset()) -> float | None:
        """Seconds until the first busy (but healthy) backend takes requests again; None when none is busy."""
        now = time.monotonic()
        waits = [
            b.busy_until - now
            for b in self.backends
            if b.busy_until and b.healthy and not b.draining and b.index not in exclude
        ]
        return max(min(waits), 0.0) if waits else None

    def unavailable(self) -> NoHealthyBackend:
        """The error for a request that finds no routable backend: busy ones say when to come back."""
        wait = self.busy_for()
        if wait is not None:
            return WorkersBusy(
                f"Every worker is busy (they answered 429/503 with Retry-After); retry in {wait:.1f}s.", wait
            )
        return NoHealthyBackend("No healthy backend is available for this request; retry shortly.")

    def changed(self) -> None:
        """Health, draining or membership changed: rebuild the routable view and tell listeners."""
        self.routable = [b for b in self.backends if b.routable]
        for listener in self._change_listeners:
            listener()

    def on_release(self, listener: Callable[[Backend], None]) -> None:
        self._release_listeners.append(listener)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._change_listeners.append(listener)

    @property
    def total_in_flight(self) -> int:
        return sum(b.in_flight for b in self.backends)

    def models(self) -> list[str]:
        """The union of models served by routable backends, sorted."""
        return sorted({m for b in self.routable for m in b.models})
