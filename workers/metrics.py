"""Prometheus metrics of one worker, in a registry owned by its app (no process-global state).

Names carry the `worker_` prefix; times are in seconds. Queue depth and running requests are read from the
batcher at scrape time, so they can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latency buckets from 5 ms to 2 min: tiny-model steps are milliseconds, long generations take a minute.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class WorkerMetrics:
    """Every metric the worker exports. `content_type` and `render()` serve GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        labels = ["model"]
        self.queue_depth = Gauge("worker_queue_depth", "Requests waiting for a batch slot", labels,
                                 registry=self.registry)
        self.running = Gauge("worker_running_requests", "Sequences in the running batch", labels,
                             registry=self.registry)
        self.batch_size = Histogram("worker_batch_size", "Sequences per batch when it starts", labels,
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batches = Counter("worker_batches", "Batches started by the engine", labels,
                               registry=self.registry)
        self.admitted = Counter("worker_admitted_requests", "Requests joined into an already running batch",
                                labels, registry=self.registry)
        self.generated_tokens = Counter("worker_generated_tokens", "Tokens generated", labels,
                                        registry=self.registry)
        self.prompt_tokens = Counter("worker_prompt_tokens", "Prompt tokens accepted", labels,
                                     registry=self.registry)
        self.requests = Counter("worker_requests", "HTTP generation requests by endpoint and status",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.request_latency = Histogram("worker_request_latency_seconds", "Arrival to last token",
                                         labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_cap = Gauge("worker_batch_cap", "Most rows stepped together now: the batch size, lower "
                               "for a while after an out-of-memory step", labels, registry=self.registry)
        self.out_of_memory = Counter("worker_out_of_memory_steps", "Steps that ran out of memory (the "
                                     "batch was split and retried)", labels, registry=self.registry)
        self.ttft = Histogram("worker_time_to_first_token_seconds", "Arrival to first generated token",
                              labels, buckets=LATENCY_BUCKETS, registry=self.registry)

    def track_load(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        """Read queue depth and running count from their owner at scrape time."""
        self.queue_depth.labels(self.model).set_function(queue_depth)
        self.running.labels(self.model).set_function(running)

    def track_cap(self, cap: Callable[[], float]) -> None:
        self.batch_cap.labels(self.model).set_function(cap)

    def observe_out_of_memory(self) -> None:
        self.out_of_memory.labels(self.model).inc()

    def observe_batch(self, size: int) -> None:
        self.batches.labels(self.model).inc()
        self.batch_size.labels(self.model).observe(size)

    def observe_admitted(self, count: int) -> None:
        self.admitted.labels(self.model).inc(count)

    def observe_tokens(self, count: int) -> None:
        if count:
            self.generated_tokens.labels(self.model).inc(count)

    def observe_prompt(self, count: int) -> None:
        self.prompt_tokens.labels(self.model).inc(count)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model).observe(seconds)

    def observe_request(self, endpoint: str, status: int, seconds: float | None) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()
        if seconds is not None:
            self.request_latency.labels(self.model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
