"""Request identity across hops: X-Request-ID (the client's, or a new one) and optional OpenTelemetry spans.

The id travels to the worker and back to the client, so one request can be followed through both logs. A W3C
`traceparent` header is never touched: it passes through to the worker like any other end-to-end header. With
--otlp-endpoint, `Tracer` exports a span per request (worker, retries, queue wait, time to first byte).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from lb.settings import ConfigError

REQUEST_ID = b"x-request-id"
# fresh ids: 128 random bits as 32 hex digits, like a uuid4 but without its os.urandom system call and
# UUID object (3 us a request); an id names a request in logs, it is no secret
_IDS = random.Random()


def request_id(raw_headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """(the id, whether the client sent it): the client's X-Request-ID when present, else a fresh one."""
    for name, value in raw_headers:
        if len(name) == 12 and name.lower() == REQUEST_ID and value:
            return value, True
    return b"%032x" % _IDS.getrandbits(128), False


@dataclass
class RequestTrace:
    """What one proxied request's span records, filled in as the request goes (see `CURRENT`)."""

    request_id: str
    traceparent: str | None
    target: str
    start_ns: int = field(default_factory=time.time_ns)
    retries: int = 0
    queue_wait_s: float = 0.0


CURRENT: ContextVar[RequestTrace | None] = ContextVar("lb_request_trace", default=None)


class Tracer:
    """One OpenTelemetry span per proxied request, exported over OTLP/HTTP in the background.

    Built only with --otlp-endpoint, so without it nothing of opentelemetry is ever imported. The span's
    parent is the client's W3C `traceparent` when it sent one.
    """

    def __init__(self, endpoint: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanKind
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise ConfigError(
                f"otlp_endpoint: needs the opentelemetry packages ({exc.name} is missing): "
                "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"
            ) from None
        self._provider = TracerProvider(resource=Resource.create({"service.name": "inference-balancer"}))
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        self._provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self._tracer = self._provider.get_tracer("lb.proxy")
        self._propagator = TraceContextTextMapPropagator()
        self._kind = SpanKind.SERVER

    def begin(
        self, raw_headers: Sequence[tuple[bytes, bytes]], request_id: bytes, target: str
    ) -> RequestTrace:
        parent = next((v for k, v in raw_headers if k.lower() == b"traceparent"), None)
        trace = RequestTrace(
            request_id.decode("latin-1"),
            parent.decode("latin-1") if parent else None,
            target.split("?", 1)[0],
        )
        CURRENT.set(trace)
        return trace

    def finish(self, worker: int, worker_url: str, status: int, ttfb_s: float) -> None:
        """Called when the response's last byte was relayed (Metrics.observe), in the request's task."""
        trace = CURRENT.get()
        if trace is None:
            return
        CURRENT.set(None)
        parent = self._propagator.extract({"traceparent": trace.traceparent}) if trace.traceparent else None
        span = self._tracer.start_span(
            f"POST {trace.target}",
            context=parent,
            kind=self._kind,
            start_time=trace.start_ns,
            attributes={
                "http.route": trace.target,
                "http.response.status_code": status,
                "lb.request_id": trace.request_id,
                "lb.worker": worker,
                "lb.worker_url": worker_url,
                "lb.retries": trace.retries,
                "lb.queue_wait_s": trace.queue_wait_s,
                "lb.time_to_first_byte_s": ttfb_s,
            },
        )
        span.end()

    def close(self) -> None:
        self._provider.shutdown()  # flushes the spans not yet exported
