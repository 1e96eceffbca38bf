"""PNG figures for the benchmarks (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from bench.client import LoadRun
    from bench.distribution import Distribution


def plot_stress(run: LoadRun, dist: Distribution | None, path: Path) -> Path:
    """Left: latency (and TTFT) histogram of successful requests; right: each worker's share of the run."""
    fig, (ax_lat, ax_share) = plt.subplots(1, 2, figsize=(11, 4))
    latencies = [r.latency * 1000 for r in run.results if r.ok]
    ttfts = [r.ttft * 1000 for r in run.results if r.ok and r.ttft is not None]
    if latencies:
        ax_lat.hist(latencies, bins=min(40, max(5, len(latencies) // 5)), alpha=0.7, label="latency")
    if ttfts:
        ax_lat.hist(ttfts, bins=min(40, max(5, len(ttfts) // 5)), alpha=0.7, label="time to first token")
    s = run.summary
    ax_lat.set_title(f"{s.ok} ok / {s.requests} requests, {s.requests_per_s:.1f} req/s")
    ax_lat.set_xlabel("ms")
    ax_lat.set_ylabel("requests")
    if latencies or ttfts:
        ax_lat.legend()
    if dist is not None and dist.workers:
        labels = [str(w.index) for w in dist.workers]
        ax_share.bar(labels, [w.requests for w in dist.workers], color="tab:green")
        ax_share.axhline(dist.total / len(dist.workers), color="grey", linestyle="--", label="even share")
        ax_share.legend()
        ax_share.set_title("requests per worker (balancer /stats)")
    else:
        by_worker = s.requests_by_worker
        ax_share.bar(list(by_worker) or ["-"], list(by_worker.values()) or [0], color="tab:green")
        ax_share.set_title("requests per worker (X-LB-Worker header)")
    ax_share.set_xlabel("worker index")
    ax_share.set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lines(
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ideal: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Path:
    """One line per named series of (x, y); an optional dashed ideal line (e.g. linear speedup)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    if ideal is not None:
        ax.plot(list(ideal[0]), list(ideal[1]), linestyle="--", color="grey", label="ideal")
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_progress(
    path: Path,
    title: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    marks: Mapping[str, float],
) -> Path:
    """Lines done over time, one line per run; `marks` are labelled vertical lines (e.g. a kill)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=name)
    for label, x in marks.items():
        ax.axvline(x, color="grey", linestyle=":", label=label)
    ax.set_title(title)
    ax.set_xlabel("seconds since the batch was created")
    ax.set_ylabel("lines with a result")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
