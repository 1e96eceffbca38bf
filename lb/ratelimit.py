"""Rate limits per API key: requests and estimated tokens per minute, over a sliding 60 s window.

Exact rather than approximate: each key keeps the (time, tokens) of its requests of the last minute, so "60
rpm" means the 61st request within any 60 s is refused, as a client counting its own calls expects. Refusals
and successes carry OpenAI's `x-ratelimit-*` headers; a refusal is a 429 `rate_limit_exceeded` with
Retry-After set to when the window has room again.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from lb.errors import BalancerError

WINDOW = 60.0  # seconds: limits are per minute
MAX_IDLE_KEYS = 10_000  # beyond this many tracked keys, those with an empty window are forgotten

Headers = list[tuple[str, str]]


class RateLimited(BalancerError):
    status = 429
    type = "requests"  # OpenAI names the exhausted limit: "requests" or "tokens"
    code = "rate_limit_exceeded"


def reset_text(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: `20ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class _KeyWindow:
    """One key's requests of the last WINDOW seconds: (monotonic time, estimated tokens)."""

    __slots__ = ("events", "tokens")

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.tokens = 0  # sum of the tokens in `events`

    def prune(self, now: float) -> None:
        events = self.events
        while events and events[0][0] <= now - WINDOW:
            self.tokens -= events.popleft()[1]

    def tokens_free_in(self, now: float, needed: int, limit: int) -> float:
        """Seconds until `needed` more tokens fit under `limit` as old requests leave the window."""
        used = self.tokens
        for at, tokens in self.events:
            used -= tokens
            if used + needed <= limit:
                return at + WINDOW - now
        return WINDOW


class RateLimiter:
    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        per_key: dict[str, tuple[int | None, int | None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default = (rpm, tpm)
        self._per_key = per_key
        self._clock = clock
        self._windows: dict[str, _KeyWindow] = {}

    def admit(self, key: str, tokens: int) -> Headers:
        """Count one request of `key` (estimated `tokens`) and return its x-ratelimit headers, or raise
        RateLimited (429) when either limit would be exceeded; a refused request is not counted."""
        rpm, tpm = self._per_key.get(key, self._default)
        if rpm is None and tpm is None:
            return []
        now = self._clock()
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= MAX_IDLE_KEYS:
                self._forget_idle(now)
            window = self._windows[key] = _KeyWindow()
        window.prune(now)
        requests = len(window.events)
        if rpm is not None and requests + 1 > rpm:
            wait = window.events[0][0] + WINDOW - now
            self._refuse(
                "requests",
                f"requests per min (RPM): Limit {rpm}, Used {requests}, Requested 1",
                wait,
                self._headers(window, now, rpm, tpm),
            )
        if tpm is not None and window.tokens + tokens > tpm:
            wait = window.tokens_free_in(now, tokens, tpm)
            self._refuse(
                "tokens",
                f"tokens per min (TPM): Limit {tpm}, Used {window.tokens}, Requested {tokens}",
                wait,
                self._headers(window, now, rpm, tpm),
            )
        window.events.append((now, tokens))
        window.tokens += tokens
        return self._headers(window, now, rpm, tpm)

    @staticmethod
    def _refuse(kind: str, detail: str, wait: float, headers: Headers) -> None:
        exc = RateLimited(
            f"Rate limit reached for this API key on {detail}. Please try again in {reset_text(wait)}."
        )
        exc.type = kind
        exc.retry_after = max(1, math.ceil(wait))
        exc.headers = tuple(headers)
        raise exc

    @staticmethod
    def _headers(window: _KeyWindow, now: float, rpm: int | None, tpm: int | None) -> Headers:
        oldest = window.events[0][0] + WINDOW - now if window.events else 0.0
        out: Headers = []
        if rpm is not None:
            out += [
                ("x-ratelimit-limit-requests", str(rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, rpm - len(window.events)))),
                ("x-ratelimit-reset-requests", reset_text(oldest)),
            ]
        if tpm is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, tpm - window.tokens))),
                ("x-ratelimit-reset-tokens", reset_text(oldest)),
            ]
        return out

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if not w.events or w.events[-1][0] <= now - WINDOW]:
            del self._windows[key]
