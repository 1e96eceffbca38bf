"""aiohttp's side of the front: the protocol a handed-over connection switches to, whose own HTTP-level errors
(aiohttp's llhttp parser rejecting a later request on that connection, a header over its limits) are
answered with the same OpenAI-style JSON body as every other error of the balancer, not aiohttp's text.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from lb.errors import BalancerError, BodyTooLarge, InvalidHttpRequest, RequestHeaderTooLarge, error_response

log = logging.getLogger("lb.front")


class InternalError(BalancerError):
    code = "internal_error"


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


class AiohttpConnections:
    """What the front hands connections to: makes aiohttp's protocol and counts the connections it holds."""

    def __init__(self, server: web.Server) -> None:
        self._server = server

    def __call__(self) -> asyncio.Protocol:
        # the arguments web.Server itself would construct its RequestHandler with (AppRunner's handler args)
        return JsonErrorsHandler(self._server, loop=self._server._loop, **self._server._kwargs)

    def __len__(self) -> int:
        return len(self._server.connections)
