"""Hostile bytes over raw sockets, through both fronts and both event loops, against a recording worker.

Each case is sent twice: first on a fresh connection (the front's llhttp parser judges it) and again after a
request that hands the connection to aiohttp (aiohttp's parser judges it). Every case checks the status,
the OpenAI-style JSON body of a refusal and that the refused connection is closed, that the next good
request on a new connection works, and what the recording worker received: nothing for a refused request,
exactly one request for an accepted one, and never a smuggled one (`/smuggled` appears in every smuggling
case's bytes, where a lax parser would find a second request).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from tests.lb_recorder import Recorder
from tests.lb_upstream import both_loops

event_loop_policy = pytest.fixture(scope="module", params=["asyncio", "uvloop"])(both_loops)

CHAT = b"/v1/chat/completions"
BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()
SMUGGLED = b"POST /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
HEADER_TIMEOUT = 0.5  # seconds, the balancer's --header-timeout and --body-timeout here
MAX_BODY = 1 << 20


def req(head: bytes, body: bytes = BODY, target: bytes = CHAT, line: bytes | None = None) -> bytes:
    """A request to the chat endpoint with `head` as its header lines (each ending in CRLF)."""
    request_line = line if line is not None else b"POST %b HTTP/1.1" % target
    return request_line + b"\r\nHost: lb\r\n" + head + b"\r\n" + body


def cl(body: bytes = BODY) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def good() -> bytes:
    return req(cl() + b"Content-Type: application/json\r\n")


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    status: int  # what the client gets; a refusal (>= 400) must reach the worker as nothing at all
    later: int | None = None  # a different status when aiohttp's parser judges it (after a hand-over)
    front_only: bool = False  # deadlines: bounded by the front, not by aiohttp on a handed-over connection
    trickle: bool = False  # send the bytes and wait, never finishing the request


CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED
CASES = [
    # request smuggling: framing two parsers could read differently
    Case("cl-te", req(cl(CHUNKED_SMUGGLE) + b"Transfer-Encoding: chunked\r\n", CHUNKED_SMUGGLE), 400),
    Case("te-cl", req(b"Transfer-Encoding: chunked\r\n" + cl(CHUNKED_SMUGGLE), CHUNKED_SMUGGLE), 400),
    Case("te-xchunked", req(b"Transfer-Encoding: xchunked\r\n" + cl(CHUNKED_SMUGGLE), CHUNKED_SMUGGLE), 400),
    Case("te-space-before-colon", req(b"Transfer-Encoding : chunked\r\n", CHUNKED_SMUGGLE), 400),
    Case("te-chunked-then-identity", req(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED_SMUGGLE), 400),
    Case(
        "te-two-headers",
        req(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNKED_SMUGGLE),
        400,
    ),
    Case("te-obs-fold", req(b"Transfer-Encoding:\r\n chunked\r\n", CHUNKED_SMUGGLE), 400),
    Case("te-vertical-tab", req(b"Transfer-Encoding:\x0bchunked\r\n", CHUNKED_SMUGGLE), 400),
    Case("te-quoted", req(b'Transfer-Encoding: "chunked"\r\n', CHUNKED_SMUGGLE), 400),
    Case("te-bare-lf-injected", req(b"X-A: b\nTransfer-Encoding: chunked\r\n" + cl(), BODY), 400),
    Case("bare-lf-in-target", req(cl(), line=b"POST /v1/chat/completions\nX-Injected: 1 HTTP/1.1"), 400),
    Case("bare-lf-line-ending", req(cl()).replace(b"Host: lb\r\n", b"Host: lb\n"), 400),
    Case("bare-cr-in-header", req(b"X-A: b\rTransfer-Encoding: chunked\r\n" + cl()), 400),
    Case("nul-in-header", req(b"X-A: b\x00c\r\n" + cl()), 400),
    Case("nul-in-target", req(cl(), target=b"/v1/chat/completions\x00x"), 400),
    Case("obs-fold", req(b"X-A: a\r\n b\r\n" + cl()), 400),
    Case("cl-duplicate-same", req(cl() + cl()), 400),
    Case("cl-duplicate-different", req(cl() + b"Content-Length: 3\r\n"), 400),
    Case("cl-list", req(b"Content-Length: %d, %d\r\n" % (len(BODY), len(BODY))), 400),
    Case("cl-negative", req(b"Content-Length: -5\r\n", b""), 400),
    Case("cl-plus-sign", req(b"Content-Length: +%d\r\n" % len(BODY)), 400),
    Case("cl-hex", req(b"Content-Length: 0x10\r\n", b"0123456789abcdef"), 400),
    Case("cl-5000-digits", req(b"Content-Length: " + b"9" * 5000 + b"\r\n", b""), 400),
    Case("cl-space-inside", req(b"Content-Length: 1 0\r\n", b"0123456789"), 400),
    Case(
        "chunk-size-hex-prefix",
        req(b"Transfer-Encoding: chunked\r\n", b"0x2\r\n{}\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    Case("chunk-size-plus", req(b"Transfer-Encoding: chunked\r\n", b"+2\r\n{}\r\n0\r\n\r\n" + SMUGGLED), 400),
    Case(
        "chunk-size-overflow",
        req(b"Transfer-Encoding: chunked\r\n", b"f" * 20 + b"\r\n{}\r\n" + SMUGGLED),
        400,
    ),
    Case(
        "chunk-no-crlf-after-data",
        req(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}XX0\r\n\r\n" + SMUGGLED),
        400,
    ),
    Case(
        "chunk-extension-ctl",
        req(b"Transfer-Encoding: chunked\r\n", b"2;\x01\r\n{}\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    # header names and values
    Case("space-before-colon", req(b"Content-Length : %d\r\n" % len(BODY)), 400),
    Case("name-not-a-token", req(b"X(A): 1\r\n" + cl()), 400),
    Case("empty-name", req(b": x\r\n" + cl()), 400),
    Case("control-byte-in-value", req(b"X-A: a\x01b\r\n" + cl()), 400),
    Case("del-in-value", req(b"X-A: a\x7fb\r\n" + cl()), 400),
    Case(
        "two-authorization-headers",
        req(b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n" + cl()),
        400,
    ),
    # request line and target
    Case("target-not-ascii", req(cl(), target=b"/v1/chat/completions\xff"), 400),
    Case("target-with-space", req(cl(), line=b"POST /v1/chat/completions x HTTP/1.1"), 400),
    Case("target-del", req(cl(), target=b"/v1/chat/completions\x7f"), 400),
    Case("target-authority-form", req(cl(), target=b"example.com:80"), 400),
    Case("method-not-ascii", req(cl(), line=b"P\xffST /v1/chat/completions HTTP/1.1"), 400),
    Case("method-unknown", req(cl(), line=b"FOO /v1/chat/completions HTTP/1.1"), 400),
    Case("http-0.9", b"GET /v1/chat/completions\r\n\r\n", 400),
    Case("http-2.0-line", req(cl(), line=b"POST /v1/chat/completions HTTP/2.0"), 400),
    Case("garbage", b"GARBAGE\r\n\r\n", 400),
    # sizes
    Case("header-line-too-long", req(b"X-Big: " + b"a" * 20_000 + b"\r\n" + cl()), 431),
    Case("head-too-large", req(b"".join(b"X-%d: %b\r\n" % (i, b"a" * 8000) for i in range(9)) + cl()), 431),
    Case("too-many-headers", req(b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + cl()), 431, 400),
    Case("target-too-long", req(cl(), target=CHAT + b"?" + b"a" * 20_000), 431),
    Case("body-too-large", req(b"Content-Length: %d\r\n" % (MAX_BODY + 1), b""), 413),
    # deadlines (a handed-over connection is bounded by aiohttp's keep-alive timer instead)
    Case("head-never-finished", b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\n", 408, None, True, True),
    Case("body-never-finished", req(b"Content-Length: 100\r\n", b"{"), 408, None, True, True),
    Case("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 408, None, True, True),
    # accepted, and forwarded as exactly one clean request
    Case("te-uppercase-chunked", req(b"Transfer-Encoding: CHUNKED\r\n", b"2\r\n{}\r\n0\r\n\r\n"), 200),
    Case("te-tab-before-value", req(b"Transfer-Encoding:\tchunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"), 200),
    Case("absolute-form-rewritten", req(cl(), target=b"http://evil.example" + CHAT), 200),
    Case("http-1.0", req(cl(), line=b"POST /v1/chat/completions HTTP/1.0"), 200),
    Case(
        "hop-by-hop-dropped",
        req(
            b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
            b"Proxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\n" + cl()
        ),
        200,
    ),
]
HOP_HEADERS = (
    b"x-hop:",
    b"keep-alive:",
    b"te:",
    b"proxy-authorization:",
    b"proxy-connection:",
    b"connection:",
)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def send(
    port: int, data: bytes, *, handed_over: bool, trickle: bool
) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed-after) of `data` sent on a new connection, after a hand-over or not."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if handed_over:  # a request the front gives to aiohttp: from here on aiohttp's parser reads
            writer.write(b"GET /livez HTTP/1.1\r\nHost: lb\r\n\r\n")
            assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        writer.write(data)
        status, headers, body = await asyncio.wait_for(read_response(reader), HEADER_TIMEOUT + 5)
        closed = False
        if status >= 400:
            try:
                closed = await asyncio.wait_for(reader.read(), 5) == b""
            except ConnectionResetError:
                closed = True
        return status, headers, body, closed
    finally:
        writer.close()


def check_error_body(headers: dict[str, str], body: bytes) -> str | None:
    if not headers.get("content-type", "").startswith("application/json"):
        return f"content-type {headers.get('content-type')!r}, body {body[:80]!r}"
    error = json.loads(body).get("error")
    if not isinstance(error, dict) or not error.get("message") or not error.get("type"):
        return f"not an OpenAI-style error body: {body[:120]!r}"
    return None


@pytest_asyncio.fixture(loop_scope="function")
async def cluster(balancer: Any, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Recorder, int]]:
    recorder = await Recorder().start()
    url = await balancer(
        [recorder],
        fast_front=request.param,
        header_timeout=HEADER_TIMEOUT,
        body_timeout=HEADER_TIMEOUT,
        max_body_size=MAX_BODY,
        health_check_interval=60,
    )
    yield recorder, int(url.rsplit(":", 1)[1])
    await recorder.stop()


async def run_case(recorder: Recorder, port: int, case: Case, handed_over: bool) -> list[str]:
    where = f"{case.name} ({'after a hand-over' if handed_over else 'first on its connection'})"
    expected = case.later if handed_over and case.later is not None else case.status
    mark = recorder.mark()
    problems = []
    try:
        status, headers, body, closed = await send(
            port, case.data, handed_over=handed_over, trickle=case.trickle
        )
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        return [f"{where}: no response ({type(exc).__name__})"]
    if status != expected:
        problems.append(f"{where}: status {status}, expected {expected}: {body[:100]!r}")
    if status >= 400:
        if (bad := check_error_body(headers, body)) is not None:
            problems.append(f"{where}: {bad}")
        if not closed:
            problems.append(f"{where}: the connection stayed open after the refusal")
    refused = recorder.since(mark)
    after_case = recorder.mark()
    follow = await send(port, good(), handed_over=False, trickle=False)
    if follow[0] != 200:
        problems.append(f"{where}: the next good request got {follow[0]}")
    await asyncio.sleep(0.01)
    received = recorder.since(mark)
    if b"/smuggled" in received or b"X-Injected" in received:
        problems.append(f"{where}: a smuggled request reached the worker: {received[:200]!r}")
    if status >= 400 and refused:
        problems.append(f"{where}: the worker received bytes of a refused request: {refused[:120]!r}")
    lines = recorder.requests_since(mark)
    if len(lines) != (1 if status >= 400 else 2) or len(recorder.requests_since(after_case)) != 1:
        problems.append(f"{where}: the worker saw requests {lines}")
    if case.name == "absolute-form-rewritten" and (
        b"evil" in received or not received.startswith(b"POST /v1/")
    ):
        problems.append(f"{where}: the target was not forwarded in origin form: {received[:80]!r}")
    if case.name == "hop-by-hop-dropped":
        first = received.split(b"\r\n\r\n", 1)[0].lower()
        leaked = [h for h in HOP_HEADERS if b"\r\n" + h in first]
        if leaked:
            problems.append(f"{where}: hop-by-hop headers reached the worker: {leaked}")
    return problems


@pytest.mark.parametrize("cluster", [True, False], ids=["fast-front", "aiohttp-front"], indirect=True)
async def test_hostile_requests_never_reach_a_worker(cluster: tuple[Recorder, int]) -> None:
    recorder, port = cluster
    assert len(CASES) >= 40
    problems: list[str] = []
    for handed_over in (False, True):
        runs = [c for c in CASES if not (handed_over and c.front_only)]
        for case in runs:
            problems += await run_case(recorder, port, case, handed_over)
    assert not problems, "\n".join(problems)
