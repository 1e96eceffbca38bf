"""aiohttp's side of the front: the protocol a handed-over connection switches to, whose own HTTP-level errors
(aiohttp's llhttp parser rejecting a later request on that connection, a header over its limits) are
answered with the same OpenAI-style JSON body as every other error of the balancer, not aiohttp's text.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from lb.errors import (
    BalancerError,
    BodyTooLarge,
    Handler,
    InvalidHttpRequest,
    RequestHeaderTooLarge,
    error_response,
)

log = logging.getLogger("lb.front")


class InternalError(BalancerError):
    code = "internal_error"


class HttpError(BalancerError):
    """An HTTP-level refusal of aiohttp's router (a method a route does not take, ...)."""

    type = "invalid_request_error"


class JsonErrorsHandler(RequestHandler):
    """aiohttp's per-connection protocol, answering its low-level errors as JSON."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's messages quote the offending bytes (credentials included): log the kind only
        if status >= 500:
            log.error("aiohttp failed a request: %s", type(exc).__name__ if exc else status)
        else:
            log.info("refused a request (%d): %s", status, type(exc).__name__ if exc else "")
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed instead")
        reason = (str(getattr(exc, "message", "") or "").splitlines() or [""])[0].rstrip(":")
        error: BalancerError
        if isinstance(exc, LineTooLong):
            error = RequestHeaderTooLarge("A request line or header is over the size limit.")
        elif status == 413:
            error = BodyTooLarge("The request body is over the size limit.")
        elif 400 <= status < 500:
            error = InvalidHttpRequest(f"Malformed HTTP request: {reason or 'rejected by the parser'}.")
            error.status = status
        else:
            error = InternalError("The balancer failed to handle this request.")
        response = error_response(error)
        response.force_close()
        return response


@web.middleware
async def json_http_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own HTTP exceptions (an unknown method on a route, a body over client_max_size) as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error: BalancerError = BodyTooLarge(exc.reason) if exc.status == 413 else InternalError(exc.reason)
        if 400 <= exc.status < 500 and exc.status != 413:
            error = HttpError(exc.reason)
        error.status = exc.status
        response = error_response(error)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response


def check_request(request: web.Request, max_head: int) -> None:
    """What aiohttp's parser lets through but a proxy must refuse, as the front refuses it
    (lb/request_head.py): an HTTP/0.9 request line (how llhttp reads a bare LF in a target), a head over
    --max-header-size in all, two Authorization headers."""
    if request.version not in (HttpVersion10, HttpVersion11):
        raise InvalidHttpRequest("Only HTTP/1.0 and HTTP/1.1 requests are served.")
    size = (
        len(request.method) + len(request.raw_path) + sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
    )
    if size > max_head:
        raise RequestHeaderTooLarge(f"The request head exceeds {max_head} bytes.")
    if len(request.headers.getall("Authorization", ())) > 1:
        raise InvalidHttpRequest("The request has more than one Authorization header.")


class AiohttpConnections:
    """What the front hands connections to: makes aiohttp's protocol and counts the connections it holds."""

    def __init__(self, server: web.Server) -> None:
        self._server = server

    def __call__(self) -> asyncio.Protocol:
        # the arguments web.Server itself would construct its RequestHandler with (AppRunner's handler args)
        return JsonErrorsHandler(self._server, loop=self._server._loop, **self._server._kwargs)

    def __len__(self) -> int:
        return len(self._server.connections)
