"""Server-sent events for streaming responses: `data: <json>\n\n` frames ending with `data: [DONE]`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class SSEStream:
    """One streaming response. `send` returns False once the client has gone, so callers stop generating."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                     "X-Accel-Buffering": "no"},
        )
        self.open = False

    async def start(self) -> None:
        await self.response.prepare(self.request)
        self.open = True

    async def send(self, payload: dict[str, Any] | str) -> bool:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        return await self._write(f"data: {data}\n\n".encode())

    async def done(self) -> bool:
        ok = await self._write(b"data: [DONE]\n\n")
        if ok:
            try:
                await self.response.write_eof()
            except ConnectionError:
                return False
        return ok

    async def _write(self, frame: bytes) -> bool:
        if not self.open:
            return False
        try:
            await self.response.write(frame)
        except ConnectionError:  # the client disconnected (aiohttp raises ClientConnectionResetError)
            self.open = False
        return self.open
