"""One HTTP request's generation, shared by every endpoint: n engine requests, their events, usage totals.

Entering the context submits to the batcher, so a full queue (429) or a prompt that does not fit (400) is
raised before a handler starts a response; leaving it cancels whatever is unfinished (client gone, error).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from types import TracebackType

from workers.engines.base import BadEngineParameter, EngineRequest, PromptTooLongError, TokenEvent
from workers.errors import ContextLengthExceeded, InvalidRequest
from workers.protocol import GenerationRequest
from workers.state import WorkerState
from workers.submission import Submission


@dataclass
class Choice:
    """What one of the n samples produced so far."""

    index: int
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, event: TokenEvent) -> None:
        if event.text:
            self.parts.append(event.text)
        self.tokens += event.num_tokens
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


class Generation:
    """`async with Generation(state, request, prompt) as run: async for choice, event in run.events(): ...`"""

    def __init__(self, state: WorkerState, request: GenerationRequest, prompt: str, id_prefix: str) -> None:
        self.state = state
        self.request = request
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrived_at = time.monotonic()
        self.choices = [Choice(i) for i in range(request.n)]
        params = request.params
        default_max_tokens = state.engine.info.default_max_tokens
        # no max_tokens: up to the end of the context, unless the engine has its own default length
        self._fill_context = request.max_tokens is None and default_max_tokens is None
        if request.max_tokens is None and default_max_tokens is not None:
            params = replace(params, max_new_tokens=default_max_tokens)
        self._requests = [
            EngineRequest(f"{self.id}-{i}", prompt,
                          params if params.seed is None else replace(params, seed=params.seed + i))
            for i in range(request.n)
        ]
        self._index = {r.request_id: i for i, r in enumerate(self._requests)}
        self._stack = AsyncExitStack()
        self._submission: Submission | None = None

    @property
    def prompt_tokens(self) -> int:
        return self._submission.prompt_tokens if self._submission else 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def elapsed(self) -> float:
        """Seconds since the request arrived."""
        return time.monotonic() - self.arrived_at

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def __aenter__(self) -> Generation:
        submit = self.state.batcher.submit(
            self._requests, fill_context=self._fill_context, arrived_at=self.arrived_at
        )
        try:
            self._submission = await self._stack.enter_async_context(submit)
        except PromptTooLongError as exc:
            raise ContextLengthExceeded(str(exc), param=self.request.prompt_field) from None
        except BadEngineParameter as exc:
            raise InvalidRequest(str(exc), param=exc.field) from None
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def events(self) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """Each event with the choice it belongs to (already updated with it)."""
        assert self._submission is not None, "use inside `async with`"
        async for event in self._submission.events():
            choice = self.choices[self._index[event.request_id]]
            choice.add(event)
            yield choice, event
