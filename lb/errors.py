"""The balancer's named failures and the one place they become OpenAI-style JSON error responses."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BalancerError(Exception):
    """A request the balancer answers itself; subclasses fix the HTTP status and the OpenAI error type."""

    status = 500
    type = "server_error"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After
    headers: tuple[tuple[str, str], ...] = ()  # more response headers (e.g. x-ratelimit-*)

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param


class BadRequest(BalancerError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_json"


class InvalidHttpRequest(BadRequest):
    """Bytes a strict HTTP/1.1 parser rejects; the connection is closed after the answer."""

    code = "invalid_http_request"


class RequestTimeout(BalancerError):
    """A request head or body did not arrive within --header-timeout / --body-timeout."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RequestHeaderTooLarge(BalancerError):
    """A header line or the whole head is over its limit (refused before buffering more)."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_too_large"


class Unauthorized(BalancerError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(BalancerError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(BalancerError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"
    param = "model"


class BodyTooLarge(BalancerError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(BalancerError):
    """Every backend is at its in-flight cap and the wait queue is full, or the wait timed out."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after = 1


class NoHealthyBackend(BalancerError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_backend"
    retry_after = 2


class TooManyConnections(BalancerError):
    """--max-connections client connections are open; a new one is answered this and closed."""

    status = 503
    type = "service_unavailable"
    code = "too_many_connections"
    retry_after = 1


class ShuttingDown(BalancerError):
    """The balancer is draining after SIGTERM/SIGINT: queued and new requests are turned away."""

    status = 503
    type = "service_unavailable"
    code = "shutting_down"
    retry_after = 1


class WorkersBusy(NoHealthyBackend):
    """Every healthy worker asked for rest (429/503 with Retry-After); Retry-After says when one is free."""

    code = "workers_busy"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class UpstreamFailed(BalancerError):
    """Every attempt failed at the transport level before any byte reached the client."""

    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class GatewayTimeout(BalancerError):
    """The worker accepted the request but sent no response within --request-timeout."""

    status = 504
    type = "upstream_error"
    code = "gateway_timeout"


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def error_headers(exc: BalancerError) -> list[tuple[str, str]]:
    """Retry-After and any extra headers an error answer carries."""
    headers = [("Retry-After", str(exc.retry_after))] if exc.retry_after is not None else []
    return headers + list(exc.headers)


def error_response(exc: BalancerError) -> web.Response:
    headers = error_headers(exc) or None
    return web.Response(
        status=exc.status,
        body=error_body(exc.message, exc.type, exc.code, exc.param),
        content_type="application/json",
        headers=headers,
    )


def error_bytes(exc: BalancerError, *, close: bool) -> bytes:
    """A whole HTTP/1.1 response carrying the error, for code that writes to a socket itself."""
    body = error_body(exc.message, exc.type, exc.code, exc.param)
    retry = b"Retry-After: %d\r\n" % exc.retry_after if exc.retry_after is not None else b""
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b%b\r\n%b" % (
        exc.status,
        HTTPStatus(exc.status).phrase.encode(),
        len(body),
        retry,
        b"Connection: close\r\n" if close else b"",
        body,
    )


def sse_error_event(
    message: str, type_: str = "upstream_error", code: str = "upstream_disconnected"
) -> bytes:
    """The last event of a stream that cannot finish after bytes were sent (OpenAI SDKs raise on it): its
    backend failed, or the balancer reached its drain deadline."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"


def answers_errors(handler: Handler) -> Handler:
    """Wrap an admin handler so a BalancerError becomes its JSON response (the proxy does this inline)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BalancerError as exc:
            return error_response(exc)

    return wrapped
