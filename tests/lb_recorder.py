"""A recording upstream for the adversarial tests: a raw-socket worker that logs every byte it receives.

It parses leniently on purpose (bare LF ends a line, the last Content-Length wins, as the laxest servers
do), so a request smuggled past the balancer would show up here as a request of its own. Connections whose
first request is a health probe or a telemetry read are the balancer's own sessions: they are kept apart
from `received`. A request carrying `X-Script: NAME` is answered with the scripted, possibly broken, bytes
of SCRIPTS.
"""

from __future__ import annotations

import asyncio
import json
import re

from tests.processes import free_port

REQUEST_LINE = re.compile(rb"(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) /\S* HTTP/1\.[01]\r?\n")
OK_BODY = json.dumps(
    {
        "id": "ok",
        "object": "chat.completion",
        "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }
).encode()
# what the balancer's own sessions ask a worker (health probe, telemetry): never a client's request
PROBES = tuple(
    b"GET %b " % path
    for path in (b"/health", b"/v1/models", b"/metrics", b"/system", b"/gpu", b"/version", b"/info")
)
SSE_EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "t"}}]}\n\n'


def _ok(body: bytes = OK_BODY, ctype: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nContent-Length: %d\r\n\r\n%b" % (ctype, len(body), body)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
JSON_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
# name -> (bytes sent at once, bytes sent 0.1 s later or None, close the connection afterwards)
SCRIPTS: dict[str, tuple[bytes, bytes | None, bool]] = {
    "cl-negative": (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello", None, False),
    "cl-underscore": (b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\nhelloworld", None, False),
    "cl-letters": (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello", None, False),
    "cl-two-values": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        None,
        False,
    ),
    "cl-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        None,
        False,
    ),
    "chunk-hex-prefix": (JSON_CHUNKED_HEAD + b"0x5\r\nhello\r\n0\r\n\r\n", None, False),
    "chunk-plus-sign": (JSON_CHUNKED_HEAD + b"+5\r\nhello\r\n0\r\n\r\n", None, False),
    "chunk-no-crlf": (JSON_CHUNKED_HEAD + b"5\r\nhelloXX0\r\n\r\n", None, False),
    "head-huge": (
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
        None,
        False,
    ),
    "head-bare-lf": (b"HTTP/1.1 200 OK\r\nX-A: b\nContent-Length: 2\r\n\r\n{}", None, False),
    "status-999": (b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\n{}", None, False),
    "status-letters": (b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\n{}", None, False),
    "close-mid-body": (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial": ', None, True),
    "bytes-after-response": (_ok() + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED", None, False),
    # valid, with hop-by-hop headers the client must not see
    "hop-by-hop": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nX-Kept: 1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(OK_BODY), OK_BODY),
        None,
        False,
    ),
    # after the first byte reached the client
    "sse-bad-chunk-later": (SSE_HEAD + _chunk(SSE_EVENT), b"zz\r\nnope\r\n", False),
    "sse-close-later": (SSE_HEAD + _chunk(SSE_EVENT), b"", True),
    "json-bad-chunk-later": (JSON_CHUNKED_HEAD + _chunk(b'{"partial": '), b"0x5\r\nhello\r\n", False),
}


class RecordedConnection(asyncio.Protocol):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.received = b""
        self.probe: bool | None = None  # the balancer's health-probe session, known from the first request
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.recorder.connections.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.probe is None:
            self.probe = data.startswith(PROBES)
        if not self.probe:
            self.received += data
        self.buffer += data
        while self._answer_one():
            pass

    def _answer_one(self) -> bool:
        """Answer the first whole request in the buffer, parsed as leniently as the laxest servers do."""
        match = re.search(rb"\r?\n\r?\n", self.buffer)
        if match is None:
            return False
        head, rest = self.buffer[: match.start()], self.buffer[match.end() :]
        lines = re.split(rb"\r?\n", head)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()  # the last one wins
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            end = rest.find(b"0\r\n\r\n")
            if end < 0:
                return False
            body_len = end + 5
        else:
            try:
                body_len = int(headers.get(b"content-length", b"0") or 0)
            except ValueError:
                body_len = 0
            if len(rest) < body_len:
                return False
        self.buffer = rest[body_len:]
        self._respond(lines[0], headers.get(b"x-script", b"").decode())
        return True

    def _respond(self, request_line: bytes, script: str) -> None:
        assert self.transport is not None
        if request_line.startswith(b"GET /health"):
            self.transport.write(_ok(json.dumps({"status": "ok", "model": "tiny"}).encode()))
        elif request_line.startswith(b"GET /v1/models"):
            self.transport.write(_ok(json.dumps({"object": "list", "data": [{"id": "tiny"}]}).encode()))
        elif script in SCRIPTS:
            now, later, close = SCRIPTS[script]
            self.transport.write(now)
            if later is None:
                if close:
                    self.transport.close()
                return
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, self._send_later, later, close)
        else:
            self.transport.write(_ok())

    def _send_later(self, data: bytes, close: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if data:
                self.transport.write(data)
            if close:
                self.transport.close()


class Recorder:
    """The recording worker; `mark()` then `since(mark)` gives what client traffic reached it meanwhile."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: list[RecordedConnection] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> Recorder:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: RecordedConnection(self), "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.abort()

    def mark(self) -> dict[int, int]:
        return {id(c): len(c.received) for c in self.connections}

    def since(self, mark: dict[int, int]) -> bytes:
        """Client-path bytes received after `mark`, connection by connection."""
        return b"".join(c.received[mark.get(id(c), 0) :] for c in self.connections if not c.probe)

    def requests_since(self, mark: dict[int, int]) -> list[bytes]:
        """Request lines (as a lenient server would see them) received after `mark`."""
        return REQUEST_LINE.findall(self.since(mark))
