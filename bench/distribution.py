"""How a run's requests spread over the workers, as the balancer's `GET /stats` counted them.

`/stats` (issue 3) holds per-worker `requests_served` counters since start; a benchmark reads it before and
after its run and reports the difference, so earlier traffic does not blur the figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerShare:
    index: int
    url: str
    requests: int  # served during the run
    errors: int  # errors counted during the run
    share: float  # of all requests served during the run
    healthy: bool


@dataclass(frozen=True)
class Distribution:
    workers: list[WorkerShare]
    total: int  # sum over workers of requests served during the run
    balancer_total_delta: int | None  # the balancer's own total_requests difference
    max_min_ratio: float | None  # busiest / least busy worker; None when one served nothing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _counter(worker: dict[str, Any], key: str) -> int:
    value = worker.get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


def distribution(before: dict[str, Any], after: dict[str, Any]) -> Distribution:
    """Per-worker deltas, matched by URL (indices may shift when workers are added or removed)."""
    old = {str(w.get("url")): w for w in before.get("workers", [])}
    rows: list[tuple[int, str, int, int, bool]] = []
    for worker in after.get("workers", []):
        url = str(worker.get("url"))
        prev = old.get(url, {})
        served = _counter(worker, "requests_served") - _counter(prev, "requests_served")
        errors = _counter(worker, "errors") - _counter(prev, "errors")
        rows.append((_counter(worker, "index"), url, served, errors, bool(worker.get("healthy", False))))
    total = sum(r[2] for r in rows)
    shares = [
        WorkerShare(index=i, url=u, requests=n, errors=e, share=n / total if total else 0.0, healthy=h)
        for i, u, n, e, h in rows
    ]
    counts = [s.requests for s in shares]
    ratio = max(counts) / min(counts) if counts and min(counts) > 0 else None
    delta = None
    if isinstance(after.get("total_requests"), int) and isinstance(before.get("total_requests"), int):
        delta = int(after["total_requests"]) - int(before["total_requests"])
    return Distribution(workers=shares, total=total, balancer_total_delta=delta, max_min_ratio=ratio)
