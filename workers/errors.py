"""The worker's named errors and the one place they become OpenAI-style JSON responses.

Body shape, whatever went wrong: `{"error": {"message", "type", "param", "code"}}`. Handlers raise; the
middleware in `error_middleware` answers, so no handler builds an error response itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from workers.engines.base import BadEngineParameter, PromptTooLongError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class APIError(Exception):
    """An error a client can be told about. Subclasses fix the status and type."""

    status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


class InvalidRequest(APIError):
    """Malformed JSON, a wrong type, a missing or out-of-range field."""

    status = 400
    error_type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    """A parameter this worker does not implement: refused rather than silently ignored."""

    code = "unsupported_parameter"


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus the requested tokens do not fit in the model's context."""

    code = "context_length_exceeded"


class ModelNotFound(APIError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(APIError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(APIError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class QueueFull(APIError):
    """Too many requests are waiting; raised before any work, so a balancer may try another worker."""

    status = 429
    error_type = "rate_limit_error"
    code = "queue_full"
    retry_after_s = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NotReady(APIError):
    """The engine is still loading, or the worker is draining for shutdown."""

    status = 503
    error_type = "service_unavailable"
    code = "not_ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class EngineFailed(APIError):
    """The engine raised while generating this request's batch."""

    status = 500
    error_type = "server_error"
    code = "engine_error"


def error_response(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers())


def as_api_error(exc: BaseException) -> APIError:
    """The client-facing form of any exception that reached the edge of a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return ContextLengthExceeded(str(exc), param="max_tokens")
    if isinstance(exc, BadEngineParameter):
        return InvalidRequest(str(exc), param=exc.field)
    return EngineFailed(f"internal error: {type(exc).__name__}: {exc}")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn raised errors (ours, aiohttp's 404/405, anything unexpected) into OpenAI-style JSON."""
    try:
        return await handler(request)
    except APIError as exc:
        return error_response(exc)
    except web.HTTPNotFound:
        return error_response(RouteNotFound(f"no route for {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals, e.g. 413 for a body over client_max_size
        problem = InvalidRequest(exc.reason or exc.text or "bad request")
        problem.status = exc.status
        return error_response(problem)
    except (PromptTooLongError, BadEngineParameter) as exc:
        return error_response(as_api_error(exc))
    except Exception as exc:  # the request's outer edge: log it, answer 500, keep serving everyone else
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(as_api_error(exc))
