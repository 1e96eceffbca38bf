"""Prometheus metrics on the balancer's own registry; per-backend counts are read from the pool when scraped.

Hot-path cost is kept to a few histogram observations per request: counters by backend and status, in-flight,
health and queue depth live as plain ints on Backend/Admission and a collector turns them into samples.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lb.backends import Backend, BackendPool
from lb.latency import RecentRequests
from lb.tracing import CURRENT, RequestTrace, Tracer

# seconds, for latency, time to first byte and queue wait
LATENCY_BUCKETS = (5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120, 300)
OVERHEAD_BUCKETS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)  # seconds


class FastHistogram:
    """A Prometheus histogram without locks or label lookups: the event loop is its only writer."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self) -> HistogramMetricFamily:
        cumulative: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip([*map(floatToGoString, self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


class Metrics:
    def __init__(self, pool: BackendPool, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = FastHistogram(
            "lb_request_duration_seconds", "Arrival to last byte relayed, proxied requests", LATENCY_BUCKETS
        )
        self.ttfb = FastHistogram(
            "lb_time_to_first_byte_seconds", "Arrival to the worker's response headers", LATENCY_BUCKETS
        )
        self.overhead = FastHistogram(
            "lb_overhead_seconds",
            "Balancer time before forwarding an attempt (auth, body, routing, queue wait)",
            OVERHEAD_BUCKETS,
        )
        self.queue_wait = FastHistogram(
            "lb_queue_wait_seconds", "Time requests waited in the admission queue", LATENCY_BUCKETS
        )
        self.rejections: dict[int, int] = {}  # status -> requests the balancer answered itself
        self.retries: dict[int, int] = {}  # backend index -> attempts retried elsewhere
        self.stream_failures = 0
        self.client_disconnects = 0
        self.busy_answers: dict[int, int] = {}  # backend index -> 429/503 + Retry-After answers
        self.cache_hits = 0
        self.cache_misses = 0
        self.scale_decisions: dict[tuple[str, str], int] = {}  # (direction, outcome) -> hook calls
        self.recent = RecentRequests()  # the dashboard's recent rates and percentiles
        self.tracer: Tracer | None = None  # set with --otlp-endpoint: a span per request
        self.registry.register(_PoolCollector(pool, queue_depth, self))

    def observe(self, backend: Backend, status: int, ttfb: float, total: float) -> None:
        self.ttfb.observe(ttfb)
        self.latency.observe(total)
        self.recent.record(backend.index, ttfb, total, status)
        if self.tracer is not None:
            self.tracer.finish(backend.index, backend.url, status, ttfb)

    def begin_trace(self, raw_headers: Sequence[tuple[bytes, bytes]], request_id: bytes, target: str) -> None:
        """A proxied request starts: open its trace record (only when spans are exported)."""
        if self.tracer is not None:
            self.tracer.begin(raw_headers, request_id, target)

    def waited(self, seconds: float) -> None:
        """A request left the admission queue after `seconds`."""
        self.queue_wait.observe(seconds)
        if self.tracer is not None:
            trace: RequestTrace | None = CURRENT.get()
            if trace is not None:
                trace.queue_wait_s += seconds

    def rejected(self, status: int) -> None:
        self.rejections[status] = self.rejections.get(status, 0) + 1

    def retried(self, backend: Backend) -> None:
        self.retries[backend.index] = self.retries.get(backend.index, 0) + 1
        if self.tracer is not None and (trace := CURRENT.get()) is not None:
            trace.retries += 1

    def busy(self, backend: Backend) -> None:
        self.busy_answers[backend.index] = self.busy_answers.get(backend.index, 0) + 1

    def cache_lookup(self, hit: bool) -> None:
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1

    def scaled(self, direction: str, outcome: str) -> None:
        key = (direction, outcome)
        self.scale_decisions[key] = self.scale_decisions.get(key, 0) + 1

    def stream_failed(self, backend: Backend) -> None:
        self.stream_failures += 1

    def client_gone(self, backend: Backend) -> None:
        self.client_disconnects += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    def __init__(self, pool: BackendPool, queue_depth: Callable[[], int], metrics: Metrics) -> None:
        self._pool = pool
        self._queue_depth = queue_depth
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "lb_requests",
            "Responses relayed, by backend and HTTP status",
            labels=["backend", "url", "status"],
        )
        errors = CounterMetricFamily(
            "lb_backend_errors", "Transport failures and 5xx answers, by backend", labels=["backend", "url"]
        )
        in_flight = GaugeMetricFamily(
            "lb_backend_in_flight", "Requests in flight, by backend", labels=["backend", "url"]
        )
        healthy = GaugeMetricFamily(
            "lb_backend_healthy", "1 when the backend receives requests", labels=["backend", "url"]
        )
        retries = CounterMetricFamily(
            "lb_retries", "Attempts retried on another backend, by failed backend", labels=["backend"]
        )
        for b in self._pool.backends:
            labels = [str(b.index), b.url]
            for status, count in sorted(b.status_counts.items()):
                requests.add_metric([*labels, str(status)], count)
            errors.add_metric(labels, b.errors)
            in_flight.add_metric(labels, b.in_flight)
            healthy.add_metric(labels, 1.0 if b.routable else 0.0)
        for index, count in sorted(self._metrics.retries.items()):
            retries.add_metric([str(index)], count)
        rejected = CounterMetricFamily(
            "lb_rejected", "Requests the balancer answered itself, by status", labels=["status"]
        )
        for status, count in sorted(self._metrics.rejections.items()):
            rejected.add_metric([str(status)], count)
        busy = CounterMetricFamily(
            "lb_backend_busy",
            "429/503 answers with Retry-After (the backend was routed around, not ejected), by backend",
            labels=["backend"],
        )
        for index, count in sorted(self._metrics.busy_answers.items()):
            busy.add_metric([str(index)], count)
        tokens = GaugeMetricFamily(
            "lb_backend_tokens_in_flight",
            "Estimated tokens (body bytes / 4 + max_tokens) in flight, by backend",
            labels=["backend", "url"],
        )
        for b in self._pool.backends:
            tokens.add_metric([str(b.index), b.url], b.tokens_in_flight)
        cache = CounterMetricFamily(
            "lb_cache_lookups", "Response cache lookups of deterministic requests", labels=["result"]
        )
        cache.add_metric(["hit"], self._metrics.cache_hits)
        cache.add_metric(["miss"], self._metrics.cache_misses)
        scale = CounterMetricFamily(
            "lb_scale_decisions",
            "Auto-scaling hook calls, by direction and outcome (ok, failed)",
            labels=["direction", "outcome"],
        )
        for (direction, outcome), count in sorted(self._metrics.scale_decisions.items()):
            scale.add_metric([direction, outcome], count)
        yield from (requests, errors, in_flight, healthy, retries, rejected, busy, tokens, cache, scale)
        m = self._metrics
        yield from (h.family() for h in (m.latency, m.ttfb, m.overhead, m.queue_wait))
        yield GaugeMetricFamily(
            "lb_queue_depth", "Requests waiting for a free backend", value=self._queue_depth()
        )
        yield CounterMetricFamily(
            "lb_stream_failures",
            "Streams ended with an error event after bytes were sent",
            value=self._metrics.stream_failures,
        )
        yield CounterMetricFamily(
            "lb_client_disconnects",
            "Streams the client left before the end",
            value=self._metrics.client_disconnects,
        )
