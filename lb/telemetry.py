"""TelemetryGatherer: every few seconds, in the background, read each worker's /metrics, /gpu and /system.

Never on the request path: /cluster and the dashboard read what the last round left here, so a slow, hung or
dead worker costs them nothing (each fetch has its own short timeout and each worker's result is stored as it
arrives). Engine load comes from our workers' `worker_*` metrics or vLLM's `vllm:*` names; tokens/s and TTFT
are differences of their counters between two rounds. Each round also appends one point to the history the
dashboard charts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from lb.backends import Backend, BackendPool
from lb.latency import RecentRequests, WindowStats

log = logging.getLogger("lb.telemetry")

HISTORY_SECONDS = 600.0  # the charts' span
RECENT_SECONDS = 60.0  # the window of the table's latency percentiles and error counts
UNSUPPORTED_RETRY_S = 60.0  # a worker without /gpu or /system (vLLM) is asked again this much later
# engine figure -> metric names that carry it, ours first, then vLLM's (older vLLM: gpu_cache_usage_perc)
ENGINE_METRICS = {
    "running": ("worker_running_requests", "vllm:num_requests_running"),
    "waiting": ("worker_queue_depth", "vllm:num_requests_waiting"),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "generated_tokens": ("worker_generated_tokens_total", "vllm:generation_tokens_total"),
    "ttft_sum": ("worker_time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_sum"),
    "ttft_count": ("worker_time_to_first_token_seconds_count", "vllm:time_to_first_token_seconds_count"),
}
WANTED = frozenset(name for names in ENGINE_METRICS.values() for name in names)


def parse_metrics(text: str, wanted: frozenset[str] = WANTED) -> dict[str, float]:
    """Sum each wanted series over its labels, from the Prometheus text format.

    Hand-written rather than prometheus_client's parser: we need a handful of sums out of texts of up to
    ~100 KB (vLLM's), every few seconds on the balancer's event loop, and building every family object the
    library parser makes would cost that loop far more than this line filter.
    """
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        end = len(line)
        for mark in "{ ":
            at = line.find(mark)
            if 0 <= at < end:
                end = at
        name = line[:end]
        if name not in wanted:
            continue
        rest = line[line.rfind("}") + 1 :] if line[end : end + 1] == "{" else line[end:]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            sums[name] = sums.get(name, 0.0) + value
    return sums


def engine_figures(sums: dict[str, float]) -> dict[str, float]:
    """The first metric name present for each engine figure (ours or vLLM's)."""
    out: dict[str, float] = {}
    for figure, names in ENGINE_METRICS.items():
        for name in names:
            if name in sums:
                out[figure] = sums[name]
                break
    return out


@dataclass
class WorkerTelemetry:
    """What the last rounds learnt about one worker (None: not known yet, or the worker does not say)."""

    fetched_at: float | None = None  # unix seconds of the last successful /metrics read
    error: str | None = None  # why the last read failed
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1, vLLM only
    generated_tokens: float | None = None
    tokens_per_s: float | None = None
    ttft_ms: float | None = None  # mean time to first token of the requests that started since last round
    gpu: Any = None  # the worker's /gpu answer
    system: Any = None  # the worker's /system answer
    recent: WindowStats | None = None
    last_read: tuple[float, dict[str, float]] | None = None  # (monotonic time, raw figures) of the last read
    skip_until: dict[str, float] = field(default_factory=dict)  # path -> monotonic time to ask again

    def update(self, figures: dict[str, float], now: float) -> None:
        """Store one /metrics read; rates are differences with the previous read (a counter reset: none)."""
        self.fetched_at = time.time()
        self.error = None
        self.running = figures.get("running")
        self.waiting = figures.get("waiting")
        self.kv_cache_usage = figures.get("kv_cache_usage")
        self.generated_tokens = figures.get("generated_tokens")
        self.tokens_per_s = self.ttft_ms = None
        if self.last_read is not None:
            then, before = self.last_read
            elapsed = now - then
            tokens = _delta(figures, before, "generated_tokens")
            if tokens is not None and elapsed > 0:
                self.tokens_per_s = round(tokens / elapsed, 2)
            count = _delta(figures, before, "ttft_count")
            total = _delta(figures, before, "ttft_sum")
            if count and total is not None:
                self.ttft_ms = round(total / count * 1000, 2)
        self.last_read = (now, figures)


def _delta(now: dict[str, float], before: dict[str, float], key: str) -> float | None:
    if key not in now or key not in before or now[key] < before[key]:
        return None
    return now[key] - before[key]


@dataclass(frozen=True)
class HistoryPoint:
    t: float  # unix seconds
    requests_per_s: float
    tokens_per_s: float
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    queue_depth: float  # the balancer's admission queue plus every engine's waiting requests
    in_flight: int


class TelemetryGatherer:
    def __init__(
        self,
        pool: BackendPool,
        session: aiohttp.ClientSession,
        recent: RecentRequests,
        queue_depth: Callable[[], int],
        *,
        interval: float,
        timeout: float,
        work: Callable[[], list[dict[str, Any]]] = list,
    ) -> None:
        self._pool = pool
        self._session = session
        self._recent = recent
        self._queue_depth = queue_depth
        self.interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.workers: dict[int, WorkerTelemetry] = {}
        self.history: deque[HistoryPoint] = deque(maxlen=max(1, math.ceil(HISTORY_SECONDS / interval)))
        self.overall: WindowStats | None = None  # the last RECENT_SECONDS, every backend
        self.history_json = self._history_json()  # /cluster's "history", serialised once per round
        self._work = work
        self.work: list[dict[str, Any]] = []  # running batches and jobs (lb/progress.py)

    async def run(self) -> None:
        """One round per interval until cancelled; a round never outlasts the fetch timeout by much."""
        while True:
            started = time.monotonic()
            try:
                await self.gather()
            except Exception:  # a bug must not end the dashboard's data for good: log it, go on
                log.exception("telemetry round failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def gather(self) -> None:
        backends = list(self._pool.backends)
        for index in set(self.workers) - {b.index for b in backends}:
            del self.workers[index]  # removed from the pool
        await asyncio.gather(
            *(self._read(b, self.workers.setdefault(b.index, WorkerTelemetry())) for b in backends)
        )
        self.overall, by_backend = self._recent.window(RECENT_SECONDS)
        for index, telemetry in self.workers.items():
            telemetry.recent = by_backend.get(index)
        self._append_history(backends)
        self.work = self._work()

    async def _read(self, backend: Backend, telemetry: WorkerTelemetry) -> None:
        now = time.monotonic()
        try:
            text = await self._get(backend.url + "/metrics")
        except _FetchFailed as exc:
            telemetry.error = str(exc)
            telemetry.tokens_per_s = telemetry.ttft_ms = None
            return  # a worker that cannot answer /metrics will not answer the others either
        telemetry.update(engine_figures(parse_metrics(text)), now)
        for path in ("gpu", "system"):
            if telemetry.skip_until.get(path, 0.0) > now:
                continue
            try:
                setattr(telemetry, path, json.loads(await self._get(f"{backend.url}/{path}")))
            except _NotOffered:
                telemetry.skip_until[path] = now + UNSUPPORTED_RETRY_S
            except (_FetchFailed, ValueError):
                pass  # keep the last answer; the next round asks again

    async def _get(self, url: str) -> str:
        try:
            async with self._session.get(url, timeout=self._timeout) as resp:
                if resp.status == 404:
                    raise _NotOffered(url)
                if resp.status != 200:
                    raise _FetchFailed(f"GET {url} answered {resp.status}")
                return await resp.text(errors="replace")
        except TimeoutError:
            raise _FetchFailed(f"GET {url} timed out") from None
        except aiohttp.ClientError as exc:
            raise _FetchFailed(f"GET {url} failed: {exc.__class__.__name__}") from None

    def _history_json(self) -> str:
        """The history as one JSON object of columns: {"t": [...], "requests_per_s": [...], ...}."""
        names = [f.name for f in dataclasses.fields(HistoryPoint)]
        return json.dumps({name: [getattr(point, name) for point in self.history] for name in names})

    def _append_history(self, backends: list[Backend]) -> None:
        last, _ = self._recent.window(self.interval)
        tokens = sum(t.tokens_per_s or 0.0 for t in self.workers.values())
        waiting = sum(t.waiting or 0.0 for t in self.workers.values())
        self.history.append(
            HistoryPoint(
                t=round(time.time(), 3),
                requests_per_s=round(last.requests / self.interval, 2),
                tokens_per_s=round(tokens, 2),
                latency_ms_p50=last.latency_ms_p50,
                latency_ms_p99=last.latency_ms_p99,
                queue_depth=self._queue_depth() + waiting,
                in_flight=sum(b.in_flight for b in backends),
            )
        )
        self.history_json = self._history_json()


class _FetchFailed(Exception):
    pass


class _NotOffered(_FetchFailed):
    """404: this worker has no such endpoint (e.g. a vLLM server has no /gpu)."""
