"""Reduce per-request results to a benchmark's figures: rates, latency percentiles, errors by kind."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.client import RequestResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Summary:
    """Latencies in milliseconds; rates per second of wall time; tokens as reported by the server's usage."""

    requests: int
    ok: int
    errors: int
    error_rate: float
    errors_by_kind: dict[str, int]
    wall_time_s: float
    requests_per_s: float  # successful requests only
    output_tokens: int
    output_tokens_per_s: float
    latency_ms_p50: float | None
    latency_ms_p90: float | None
    latency_ms_p99: float | None
    latency_ms_mean: float | None
    ttft_ms_p50: float | None
    ttft_ms_p99: float | None
    requests_by_worker: dict[str, int]  # successful requests by the balancer's X-LB-Worker header

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table_rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a printed or Markdown table."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"

        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_kind.items())) or "none"
        return [
            ("requests (ok / total)", f"{self.ok} / {self.requests}"),
            ("wall time", f"{self.wall_time_s:.2f} s"),
            ("requests/s", f"{self.requests_per_s:.2f}"),
            ("output tokens/s", f"{self.output_tokens_per_s:.1f}"),
            ("latency p50 / p90 / p99", f"{ms(self.latency_ms_p50)} / {ms(self.latency_ms_p90)} / "
                                        f"{ms(self.latency_ms_p99)}"),
            ("TTFT p50 / p99", f"{ms(self.ttft_ms_p50)} / {ms(self.ttft_ms_p99)}"),
            ("errors", f"{self.errors} ({self.error_rate:.1%}): {errors}"),
        ]


def summarize(results: Sequence[RequestResult], wall_time: float) -> Summary:
    ok = [r for r in results if r.ok]
    latencies = [r.latency * 1000 for r in ok]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    kinds = Counter(r.error_kind or "unknown" for r in results if not r.ok)
    workers = Counter(r.worker for r in ok if r.worker is not None)
    tokens = sum(r.output_tokens for r in ok)
    wall = max(wall_time, 1e-9)
    return Summary(
        requests=len(results),
        ok=len(ok),
        errors=len(results) - len(ok),
        error_rate=(len(results) - len(ok)) / len(results) if results else 0.0,
        errors_by_kind=dict(kinds),
        wall_time_s=wall_time,
        requests_per_s=len(ok) / wall,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall,
        latency_ms_p50=percentile(latencies, 50),
        latency_ms_p90=percentile(latencies, 90),
        latency_ms_p99=percentile(latencies, 99),
        latency_ms_mean=sum(latencies) / len(latencies) if latencies else None,
        ttft_ms_p50=percentile(ttfts, 50),
        ttft_ms_p99=percentile(ttfts, 99),
        requests_by_worker=dict(sorted(workers.items(), key=lambda kv: _worker_key(kv[0]))),
    )


def _worker_key(worker: str) -> tuple[int, str]:
    return (int(worker), "") if worker.isdigit() else (1 << 30, worker)
