"""A client's request head, parsed by llhttp (httptools) and judged before any of it may reach a worker.

The lean front finds where a head ends (the first CRLF CRLF), then hands exactly those bytes to a fresh
llhttp parser, which rejects what a strict HTTP/1.1 parser rejects: bare CR or LF, NUL and other control
bytes, obs-fold, header names that are not tokens, duplicate or malformed Content-Length, Transfer-Encoding
beside Content-Length, unknown or obfuscated transfer codings. What llhttp lets through but a proxy must
not (an HTTP/0.9 request line, which is how a bare LF in the target shows up; a non-ASCII target; two
Authorization headers; too many or too long header lines) is refused here.
"""

from __future__ import annotations

import httptools

from lb.errors import InvalidHttpRequest, RequestHeaderTooLarge
from lb.http11 import origin_form

MAX_HEADERS = 128  # header lines per request, as aiohttp's server allows


class RequestHead:
    """What the front needs from a head: the request line, headers as received, and its framing."""

    __slots__ = (
        "_authorizations",
        "_max_line",
        "api_key",
        "authorization",
        "complete",
        "content_length",
        "expects",
        "headers",
        "keep_alive",
        "method",
        "target",
        "transfer_encoding",
        "upgrade",
        "version",
    )

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._authorizations = 0
        self.method = ""
        self.target = b""
        self.version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length = 0
        self.transfer_encoding = False
        self.expects = False
        self.upgrade = False
        self.keep_alive = True
        self.complete = False
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None  # X-API-Key, the model server's way of sending the key

    # llhttp callbacks
    def on_url(self, url: bytes) -> None:
        if len(url) > self._max_line:
            raise RequestHeaderTooLarge(f"The request target is longer than {self._max_line} bytes.")
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self._max_line:
            raise RequestHeaderTooLarge(f"A header line is longer than {self._max_line} bytes.")
        if len(self.headers) >= MAX_HEADERS:
            raise RequestHeaderTooLarge(f"The request has more than {MAX_HEADERS} header lines.")
        lower = name.lower()
        if lower == b"content-length":
            self.content_length = int(value)  # llhttp accepted it: digits only, one of them, no overflow
        elif lower == b"transfer-encoding":
            self.transfer_encoding = True
        elif lower == b"expect":
            self.expects = True
        elif lower == b"upgrade":
            self.upgrade = True
        elif lower == b"authorization":
            self._authorizations += 1
            self.authorization = value
        elif lower == b"x-api-key":
            self.api_key = value
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(head: bytes, max_line: int) -> RequestHead:
    """Parse one complete head (ending with CRLF CRLF); raise InvalidHttpRequest / RequestHeaderTooLarge."""
    request = RequestHead(max_line)
    parser = httptools.HttpRequestParser(request)
    try:
        parser.feed_data(head)
    except httptools.HttpParserCallbackError as exc:
        if isinstance(exc.__context__, RequestHeaderTooLarge):
            raise exc.__context__ from None
        raise InvalidHttpRequest(f"Malformed HTTP request: {exc}.") from None
    except httptools.HttpParserUpgrade:
        pass  # an Upgrade request: the front hands it to aiohttp, which declines it
    except httptools.HttpParserError as exc:
        raise InvalidHttpRequest(f"Malformed HTTP request: {exc}.") from None
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        # llhttp takes `POST /x\n...` as an HTTP/0.9 line ended by a bare LF: the injection a proxy must stop
        raise InvalidHttpRequest("Only HTTP/1.0 and HTTP/1.1 requests are served.")
    if not request.complete:
        raise InvalidHttpRequest("Malformed HTTP request: no request line.")
    target = origin_form(request.target)
    if target is None:
        raise InvalidHttpRequest(
            "The request target must be an origin-form path of visible ASCII characters."
        )
    if request._authorizations > 1:
        raise InvalidHttpRequest("The request has more than one Authorization header.")
    request.method = parser.get_method().decode("ascii")  # llhttp knows every method it accepts
    request.target = target
    request.version = version
    request.keep_alive = parser.should_keep_alive()
    return request
