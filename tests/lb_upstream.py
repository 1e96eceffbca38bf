"""A scriptable in-process upstream for the balancer's proxy-level tests (a test fixture, never a worker).

It speaks just enough of the worker contract (/health, /v1/models, /v1/chat/completions with SSE) and lets a
test decide its behaviour: answer a status, hold a stream until released, die mid-stream, record cancellation.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from tests.processes import free_port


class Upstream:
    def __init__(self, model: str = "tiny") -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.status = 200  # what generation endpoints answer; e.g. 503 to imitate a draining worker
        self.retry_after: str | None = None  # sent as Retry-After with a non-200 status (a full queue)
        self.health_status = 200
        self.health_delay = 0.0  # seconds before /health answers
        self.chunks = 3
        self.release = asyncio.Event()  # streams with hold=True wait on it after their first chunk
        self.requests = 0
        self.cancelled = 0  # streams whose client (the balancer) went away before the end
        self.finished = 0
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []  # each generation request's headers, as received
        self._runner: web.AppRunner | None = None

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.health_delay)
        return web.json_response({"status": "ok", "model": self.model}, status=self.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(raw)
        self.headers.append(dict(request.headers))
        self.requests += 1
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "busy", "type": "x", "param": None, "code": None}},
                status=self.status,
                headers={"Retry-After": self.retry_after} if self.retry_after else None,
            )
        body: dict[str, Any] = json.loads(raw or b"{}")
        if not body.get("stream"):
            self.finished += 1
            return web.json_response(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": self.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(self.chunks):
                chunk = {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "model": self.model,
                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if i == 0 and body.get("hold"):
                    await self.release.wait()
                if body.get("die_after") == i + 1:
                    assert request.transport is not None
                    request.transport.abort()  # the worker process vanishes mid-stream
                    return resp
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return resp


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A chat completion body for the upstream; `hold`, `die_after` script its stream."""
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def both_loops(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """`event_loop_policy` for proxy tests: run on asyncio and on uvloop, whose transports differ."""
    if request.param == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()
