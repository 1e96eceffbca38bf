"""`python -m bench.stub_worker --port P`: a minimal OpenAI-shaped upstream that answers at once.

The overhead benchmark needs an upstream much faster than the balancer, or it measures the worker: the real
worker (even with the fake engine and no delay) hands every request to its engine thread and costs
milliseconds. This stub is a bare asyncio protocol with canned answers: `/health`, `/v1/models`, and POSTs
answered as a completion of `max_tokens` words, or as that many SSE events when `"stream": true`. It is a
benchmark instrument only, never a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

MODEL = "fake-model"
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
_STREAM = re.compile(rb'"stream"\s*:\s*true')


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


HEALTH = _response("200 OK", "application/json", json.dumps({"status": "ok", "model": MODEL}).encode())
MODELS = _response("200 OK", "application/json", json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}).encode())
_ERROR = {"error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}}
NOT_FOUND = _response("404 Not Found", "application/json", json.dumps(_ERROR).encode())
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def completion(tokens: int) -> bytes:
    body = json.dumps({
        "id": "cmpl-stub", "object": "text_completion", "model": MODEL,
        "choices": [{"index": 0, "text": " word" * tokens, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": tokens, "total_tokens": tokens + 2},
    }).encode()
    return _response("200 OK", "application/json", body)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


EVENT = _chunk(b'data: {"id":"cmpl-stub","object":"text_completion","model":"fake-model",'
               b'"choices":[{"index":0,"text":" word","finish_reason":null}]}\n\n')
DONE = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class StubProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length request bodies only (what wrk and the balancer send)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.delay = delay  # seconds before a non-streamed answer: a worker's service time, without its CPU

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but behaves as one

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            self.respond(head.split(b" ", 2), body)

    def respond(self, request_line: list[bytes], body: bytes) -> None:
        assert self.transport is not None
        method, path = request_line[0], request_line[1] if len(request_line) > 1 else b""
        if method == b"GET":
            answers = {b"/health": HEALTH, b"/v1/models": MODELS}
            self.transport.write(answers.get(path, NOT_FOUND))
            return
        match = _MAX_TOKENS.search(body)
        tokens = int(match.group(1)) if match else 16
        if _STREAM.search(body):
            self.transport.write(SSE_HEAD)
            for _ in range(tokens):  # one write per event, as a generating worker would
                self.transport.write(EVENT)
            self.transport.write(DONE)
        elif self.delay:
            asyncio.get_running_loop().call_later(self.delay, self._write, completion(tokens))
        else:
            self.transport.write(completion(tokens))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def serve(host: str, port: int, delay: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(delay), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stub_worker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds before each non-streamed answer (default: 0)"
    )
    args = parser.parse_args(argv)
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port, args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
