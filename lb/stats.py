"""GET /stats and GET /health: the balancer's state as JSON, in the shape issue 3 fixes; and reading it back.

`fetch_stats` (lb/stats_client.py, standard library only) is the one client of /stats that the launcher's
tools, the SLURM job and the benchmarks share.
"""

from __future__ import annotations

import time
from typing import Any

from lb.backends import Backend, BackendPool
from lb.stats_client import fetch_stats


def backend_stats(b: Backend) -> dict[str, Any]:
    return {
        "index": b.index,
        "url": b.url,
        "healthy": b.healthy,
        "draining": b.draining,  # set by the admin API: no new requests, in-flight ones finish
        "requests_served": b.requests_served,
        "errors": b.errors,
        "in_flight": b.in_flight,
        "models": sorted(b.models),
        "consecutive_failures": b.consecutive_failures,
        "last_check": b.last_check,  # unix seconds of the last probe, None before the first
        "latency_ms_p50": b.latency_ms_p50(),
        "weight": b.weight,
        "tokens_in_flight": b.tokens_in_flight,
        "busy_for_s": round(max(0.0, b.busy_until - time.monotonic()), 3) if b.busy_until else 0.0,
        "discovered": b.discovered,
    }


def stats(
    pool: BackendPool, *, policy: str, total_requests: int, started: float, queue_depth: int
) -> dict[str, Any]:
    return {
        "total_workers": len(pool.backends),
        "healthy_workers": sum(1 for b in pool.backends if b.healthy),
        "total_requests": total_requests,
        "policy": policy,
        "uptime_s": round(time.monotonic() - started, 3),
        "queue_depth": queue_depth,
        "workers": [backend_stats(b) for b in pool.backends],
    }


def health(pool: BackendPool, draining: bool) -> tuple[int, dict[str, Any]]:
    """200 while at least one backend takes requests (and the balancer is not shutting down), else 503."""
    routable = len(pool.routable)
    ok = routable > 0 and not draining
    body = {
        "status": "ok" if ok else ("draining" if draining else "no_healthy_workers"),
        "healthy_workers": routable,
        "total_workers": len(pool.backends),
        "in_flight": pool.total_in_flight,
    }
    return (200 if ok else 503), body


__all__ = ["backend_stats", "fetch_stats", "health", "stats"]
