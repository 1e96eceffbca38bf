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
_LENGTH, _AUTHORIZATION, _API_KEY, _HAND_OVER = range(4)
_FRAMING = {
    b"content-length": _LENGTH,
    b"authorization": _AUTHORIZATION,
    b"x-api-key": _API_KEY,
    b"transfer-encoding": _HAND_OVER,
    b"expect": _HAND_OVER,
    b"upgrade": _HAND_OVER,
}
_FRAMING_SIZES = frozenset(len(name) for name in _FRAMING)  # most names are ruled out by length alone


class RequestHead:
    """What the front needs from a head: the request line, headers as received, and its framing."""

    __slots__ = (
        "api_key",
        "authorization",
        "authorizations",
        "complete",
        "content_length",
        "hand_over",
        "headers",
        "keep_alive",
        "method",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length = 0
        self.hand_over = False  # framing the lean front leaves to aiohttp (chunked body, Expect, Upgrade)
        self.keep_alive = True
        self.complete = False
        self.authorization: bytes | None = None
        self.authorizations = 0
        self.api_key: bytes | None = None  # X-API-Key, the model server's way of sending the key


class RequestReader:
    """One per client connection: a persistent llhttp parser (it starts over after each whole message, and
    making one per request would bind every callback again). Feed it a head, then that request's body."""

    __slots__ = ("_head", "_max_line", "_parser")

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._head = RequestHead()
        self._parser = httptools.HttpRequestParser(self)

    # llhttp callbacks
    def on_url(self, url: bytes) -> None:
        self._head.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        head.headers.append((name, value))
        if len(name) not in _FRAMING_SIZES:
            return
        kind = _FRAMING.get(name.lower())
        if kind is None:
            return
        if kind == _LENGTH:
            head.content_length = int(value)  # llhttp accepted it: digits only, one of them, no overflow
        elif kind == _AUTHORIZATION:
            head.authorizations += 1
            head.authorization = value
        elif kind == _API_KEY:
            head.api_key = value
        else:
            head.hand_over = True  # a chunked body, Expect or Upgrade: aiohttp's to serve

    def on_headers_complete(self) -> None:
        self._head.complete = True

    def read_head(self, data: bytes) -> RequestHead:
        """Parse one complete head (ending with CRLF CRLF); raise InvalidHttpRequest /
        RequestHeaderTooLarge. Unless the request is handed over, its body must follow (`read_body`)."""
        parser = self._parser
        self._head = RequestHead()  # what the callbacks fill (fewer callbacks than on_message_begin)
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, RequestHeaderTooLarge):
                raise exc.__context__ from None
            raise InvalidHttpRequest(f"Malformed HTTP request: {exc}.") from None
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade request: the front hands it to aiohttp, which declines it
        except httptools.HttpParserError as exc:
            raise InvalidHttpRequest(f"Malformed HTTP request: {exc}.") from None
        head = self._head
        if len(data) > self._max_line:  # a shorter head cannot hold a line over the limit
            longest = max([len(head.target), *(len(k) + len(v) for k, v in head.headers)])
            if longest > self._max_line:
                raise RequestHeaderTooLarge(
                    f"A request or header line is longer than {self._max_line} bytes."
                )
        if len(head.headers) > MAX_HEADERS:
            raise RequestHeaderTooLarge(f"The request has more than {MAX_HEADERS} header lines.")
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            # llhttp takes `POST /x\n...` as an HTTP/0.9 line ended by a bare LF: the injection to stop
            raise InvalidHttpRequest("Only HTTP/1.0 and HTTP/1.1 requests are served.")
        if not head.complete:
            raise InvalidHttpRequest("Malformed HTTP request: no request line.")
        target = origin_form(head.target)
        if target is None:
            raise InvalidHttpRequest(
                "The request target must be an origin-form path of visible ASCII characters."
            )
        if head.authorizations > 1:
            raise InvalidHttpRequest("The request has more than one Authorization header.")
        head.method = parser.get_method().decode("ascii")  # llhttp knows every method it accepts
        head.target = target
        head.version = version
        head.keep_alive = parser.should_keep_alive()
        return head

    def read_body(self, body: bytes) -> None:
        """The body of the head just read (Content-Length framed, so llhttp only counts it)."""
        self._parser.feed_data(body)
