"""RecentRequests: the last few thousand proxied requests (end time, backend, TTFB, latency, status).

The proxy appends one tuple per finished request (O(1), no locks: the event loop is the only writer); the
telemetry gatherer reads windows of it off the request path to compute recent rates and percentiles.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

SAMPLES = 8192  # requests kept; at more than SAMPLES / window requests per second the window shrinks to fit


@dataclass(frozen=True)
class WindowStats:
    """Figures for the requests that ended in one recent window (times in milliseconds)."""

    requests: int
    errors: int  # answers with status >= 500
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    ttfb_ms_p50: float | None


class RecentRequests:
    def __init__(self, size: int = SAMPLES) -> None:
        # (monotonic end, backend index, seconds to the worker's headers, seconds to the last byte, status)
        self.samples: deque[tuple[float, int, float, float, int]] = deque(maxlen=size)

    def record(self, backend: int, ttfb: float, total: float, status: int) -> None:
        self.samples.append((time.monotonic(), backend, ttfb, total, status))

    def window(self, seconds: float, now: float | None = None) -> tuple[WindowStats, dict[int, WindowStats]]:
        """The requests that ended in the last `seconds`: all of them, and by backend index, in one pass."""
        since = (time.monotonic() if now is None else now) - seconds
        groups: dict[int | None, tuple[list[float], list[float], list[int]]] = {None: ([], [], [0])}
        overall = groups[None]
        for ended, index, ttfb, total, status in reversed(self.samples):  # newest first: stop at the window
            if ended < since:
                break
            group = groups.get(index)
            if group is None:
                group = groups[index] = ([], [], [0])
            for latencies, ttfbs, errors in (overall, group):
                latencies.append(total)
                ttfbs.append(ttfb)
                errors[0] += status >= 500
        stats = {index: _stats(*group) for index, group in groups.items()}
        return stats.pop(None), {i: s for i, s in stats.items() if i is not None}


def _stats(latencies: list[float], ttfbs: list[float], errors: list[int]) -> WindowStats:
    latencies.sort()
    ttfbs.sort()
    return WindowStats(
        requests=len(latencies),
        errors=errors[0],
        latency_ms_p50=_ms(percentile(latencies, 50)),
        latency_ms_p99=_ms(percentile(latencies, 99)),
        ttfb_ms_p50=_ms(percentile(ttfbs, 50)),
    )


def percentile(ordered: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None when it is empty."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
