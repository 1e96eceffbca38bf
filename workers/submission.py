"""What one HTTP request hands the batcher: its engine requests (n > 1 gives several) and their event inbox.

The engine thread never touches a Submission directly: the batcher delivers events to it on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from workers.engines.base import EngineRequest, TokenEvent


class Submission:
    """The engine requests of one HTTP request (n > 1 gives several) and the events they produce."""

    def __init__(self, requests: list[EngineRequest], arrived_at: float) -> None:
        self.requests = requests
        self.arrived_at = arrived_at  # time.monotonic() when the HTTP request arrived
        self.first_token_at: float | None = None
        self.unfinished = {r.request_id for r in requests}
        self._inbox: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the first request: n samples of one prompt count it once, as OpenAI does."""
        return len(self.requests[0].prompt_token_ids) if self.requests else 0

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Every event of every request, in production order, until all finished; raises an engine error."""
        while self.unfinished:
            item = await self._inbox.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    def put(self, item: TokenEvent | BaseException) -> None:
        self._inbox.put_nowait(item)
