"""`python -m bench.scaling`: throughput of 1..N simulated GPUs behind the balancer, per routing policy.

Each worker runs the fake engine with a latency model of a batching GPU (a prefill cost per admitted batch, a
per-step cost, a small per-sequence cost per step), so a worker's throughput grows with its batch and each
worker is an independent "GPU". The largest worker set is started once; for every (N, policy) a fresh balancer
fronts the first N workers, and a closed-loop client keeps N x batch-size x load-factor requests in flight.
Throughput is counted in a steady window (after a warm-up, before the stragglers of the last requests), as
output tokens/s. With `--heterogeneous` every odd-numbered worker is 2x slower.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.client import LoadRun, LoadSpec, run_load
from bench.cluster import ClusterSpec, LocalCluster, WorkerSpec, exit_on_sigterm, start_balancer
from bench.distribution import distribution
from bench.plots import plot_lines
from bench.results import RESULTS_PATH, command_line, markdown_table, write_section
from lb.settings import ConfigError, load_config, setting
from lb.stats import fetch_stats


@dataclass(frozen=True)
class ScalingConfig:
    workers: tuple[str, ...] = setting(("1", "2", "4", "8", "16"), "worker counts to measure, e.g. 1,2,4,8")
    policy: tuple[str, ...] = setting(("round_robin", "least_connections"), "balancer policies to compare")
    heterogeneous: bool = setting(False, "make every odd-numbered worker 2x slower (all latencies doubled)")
    batch_size: int = setting(8, "each worker's batch size (the simulated GPU's slots)")
    prefill_latency: float = setting(0.05, "simulated prefill seconds per admitted batch")
    step_latency: float = setting(0.04, "simulated seconds per decode step, whatever the batch size")
    per_seq_latency: float = setting(0.001, "simulated extra seconds per decode step per running sequence")
    max_tokens: int = setting(64, "output tokens per request (sent with ignore_eos: exactly this many)")
    prompt_len: int = setting(16, "prompt words per request")
    load_factor: float = setting(1.25, "in flight = N x batch size x this (> 1 keeps batches full)")
    warmup: float = setting(5.0, "seconds of load before the measured window")
    measure: float = setting(20.0, "seconds in the measured window")
    stream: bool = setting(False, "stream responses (more client and balancer CPU per token)")
    json: str | None = setting(None, "write every measured configuration to this JSON file")
    results: bool = setting(True, "write the table to bench/RESULTS.md and the plot beside it")
    log_dir: str | None = setting(None, "directory for worker and balancer logs (default: a temporary one)")

    def __post_init__(self) -> None:
        try:
            counts = [int(n) for n in self.workers]
        except ValueError:
            raise ConfigError(f"workers: not a list of integers: {','.join(self.workers)}") from None
        if not counts or min(counts) < 1:
            raise ConfigError("workers: need positive worker counts")
        if self.batch_size < 1 or self.max_tokens < 1 or self.load_factor <= 0:
            raise ConfigError("batch_size, max_tokens and load_factor must be positive")
        if self.warmup < 0 or self.measure <= 0:
            raise ConfigError("measure must be > 0 and warmup >= 0")

    @property
    def counts(self) -> list[int]:
        return sorted({int(n) for n in self.workers})

    def worker_spec(self, index: int) -> WorkerSpec:
        slow = 2.0 if self.heterogeneous and index % 2 == 1 else 1.0
        return WorkerSpec(
            prefill_latency=self.prefill_latency * slow, step_latency=self.step_latency * slow,
            per_seq_latency=self.per_seq_latency * slow, batch_size=self.batch_size,
            extra_args=("--max-queue", str(self.batch_size * 8)),
        )

    def ideal_tokens_per_s(self, index: int) -> float:
        """Tokens/s of one saturated worker under the latency model (prefill amortised over a batch)."""
        spec = self.worker_spec(index)
        step = spec.step_latency + spec.per_seq_latency * self.batch_size
        per_request = spec.prefill_latency + self.max_tokens * step
        return self.batch_size * self.max_tokens / per_request


@dataclass
class Point:
    workers: int
    policy: str
    concurrency: int
    tokens_per_s: float  # output tokens/s completed inside the measured window
    requests_per_s: float
    latency_ms_p50: float | None
    requests: int  # sent during the whole run (warm-up and tail included)
    errors: int
    per_worker: list[int]  # requests served per worker during the whole run (balancer /stats)
    lb_cpu_percent: float  # of one core, over the run
    machine_cpu_percent: float  # of all cores, over the run
    speedup: float = 0.0
    efficiency: float = 0.0


def window_rates(run: LoadRun, start: float, end: float) -> tuple[float, float]:
    """(output tokens/s, requests/s) inside [start, end) seconds of the run.

    Requests finish in whole batches, so counting completions in a window jumps by a batch at a time; instead
    each request's tokens are spread evenly over its life (sent to answered) and the part inside the window
    counts. In a steady state this is the production rate without the batch-sized steps.
    """
    tokens = requests = 0.0
    for r in run.results:
        if not r.ok or r.latency <= 0:
            continue
        overlap = min(end, r.started + r.latency) - max(start, r.started)
        if overlap > 0:
            fraction = overlap / r.latency
            tokens += r.output_tokens * fraction
            requests += fraction
    span = end - start
    return tokens / span, requests / span


async def measure_point(config: ScalingConfig, lb_url: str, n: int, policy: str, lb_pid: int) -> Point:
    concurrency = math.ceil(n * config.batch_size * config.load_factor)
    spec = LoadSpec(
        url=lb_url, endpoint="completions", stream=config.stream, max_tokens=config.max_tokens,
        prompt_len=config.prompt_len, ignore_eos=True, concurrency=concurrency, num_requests=None,
        duration=config.warmup + config.measure, timeout=120.0,
    )
    before = fetch_stats(lb_url, timeout=5.0)
    lb_proc = psutil.Process(lb_pid)
    lb_cpu0 = sum(lb_proc.cpu_times()[:2])
    psutil.cpu_percent(None)
    wall0 = time.perf_counter()
    run = await run_load(spec)
    machine_cpu = psutil.cpu_percent(None)
    lb_cpu = (sum(lb_proc.cpu_times()[:2]) - lb_cpu0) / (time.perf_counter() - wall0) * 100
    after = fetch_stats(lb_url, timeout=5.0)
    tokens_s, requests_s = window_rates(run, config.warmup, config.warmup + config.measure)
    per_worker = [w.requests for w in distribution(before, after).workers] if before and after else []
    return Point(
        workers=n, policy=policy, concurrency=concurrency, tokens_per_s=tokens_s, requests_per_s=requests_s,
        latency_ms_p50=run.summary.latency_ms_p50, requests=run.summary.requests, errors=run.summary.errors,
        per_worker=per_worker, lb_cpu_percent=lb_cpu, machine_cpu_percent=machine_cpu,
    )


async def measure_all(config: ScalingConfig, log_dir: Path) -> list[Point]:
    counts = config.counts
    cluster_spec = ClusterSpec(
        workers=tuple(config.worker_spec(i) for i in range(max(counts))), with_balancer=False,
        log_dir=log_dir, startup_timeout=180.0,
    )
    points: list[Point] = []
    with LocalCluster(cluster_spec) as cluster:
        for policy in config.policy:
            for n in counts:
                lb, lb_url = start_balancer(
                    cluster.worker_urls[:n], policy, log_dir / f"lb-{policy}-{n}.log",
                    ("--max-retries", "0", "--health-check-interval", "5"),
                )
                try:
                    point = await measure_point(config, lb_url, n, policy, lb.pid)
                finally:
                    lb.stop()
                print(
                    f"  {policy:<18} N={n:<3} c={point.concurrency:<4} {point.tokens_per_s:9.1f} tok/s "
                    f"{point.requests_per_s:7.2f} req/s  errors {point.errors}  "
                    f"lb cpu {point.lb_cpu_percent:.0f}%  machine cpu {point.machine_cpu_percent:.0f}%",
                    file=sys.stderr, flush=True,
                )
                points.append(point)
    for point in points:
        base = next((p for p in points if p.policy == point.policy and p.workers == counts[0]), None)
        if base and base.tokens_per_s > 0:
            point.speedup = point.tokens_per_s / base.tokens_per_s * counts[0]
            point.efficiency = point.speedup / point.workers
    return points


def tables(config: ScalingConfig, points: Sequence[Point]) -> str:
    parts: list[str] = []
    for policy in config.policy:
        rows = [
            [p.workers, f"{p.tokens_per_s:.1f}", f"{p.requests_per_s:.2f}", f"{p.speedup:.2f}",
             f"{p.efficiency:.3f}", p.concurrency, p.errors, f"{p.lb_cpu_percent:.0f}%",
             f"{p.machine_cpu_percent:.0f}%", "/".join(map(str, p.per_worker))]
            for p in points if p.policy == policy
        ]
        headers = ["workers", "throughput (tok/s)", "req/s", "speedup", "efficiency", "concurrency", "errors",
                   "lb CPU (1 core)", "machine CPU", "requests per worker"]
        parts.append(f"**{policy}**\n\n" + markdown_table(headers, rows))
    if len(config.policy) > 1:
        first, *others = config.policy
        rows = []
        for n in config.counts:
            base = next(p for p in points if p.policy == first and p.workers == n)
            ratios = [
                next(p for p in points if p.policy == o and p.workers == n).tokens_per_s
                / max(base.tokens_per_s, 1e-9)
                for o in others
            ]
            rows.append([n, *(f"{r:.3f}" for r in ratios)])
        parts.append(f"**throughput relative to {first}**\n\n" + markdown_table(["workers", *others], rows))
    parts.append(target_text(config, points))
    return "\n\n".join(parts)


def target_text(config: ScalingConfig, points: Sequence[Point]) -> str:
    """Issue 4's targets, checked against this run."""
    found: list[str] = []
    if config.heterogeneous:
        for n in config.counts:
            rr = next((p for p in points if p.policy == "round_robin" and p.workers == n), None)
            lc = next((p for p in points if p.policy == "least_connections" and p.workers == n), None)
            if rr and lc and rr.tokens_per_s > 0:
                ratio = lc.tokens_per_s / rr.tokens_per_s
                verdict = "met" if ratio >= 1.2 else "missed"
                found.append(f"N={n}: least_connections {ratio:.2f}x round_robin ({verdict})")
        return "Issue 4 target, least_connections >= 1.2x round_robin: " + "; ".join(found) + "."
    for n, goal in ((8, 0.97), (16, 0.95)):
        for p in points:
            if p.workers == n:
                verdict = "met" if p.efficiency >= goal else "missed"
                found.append(f"{p.policy} N={n}: {p.efficiency:.3f} >= {goal} ({verdict})")
    listed = "; ".join(found) or "no 8- or 16-worker point in this run"
    return f"Issue 4 targets, efficiency: {listed}."


def setup_text(config: ScalingConfig) -> str:
    slow = " Every odd-numbered worker is 2x slower (all latencies doubled)." if config.heterogeneous else ""
    return (
        f"Simulated GPU per worker (fake engine): prefill {config.prefill_latency * 1000:.0f} ms per batch, "
        f"step {config.step_latency * 1000:.0f} ms + {config.per_seq_latency * 1000:.1f} ms per running "
        f"sequence, batch size {config.batch_size}; requests of {config.prompt_len} prompt words and exactly "
        f"{config.max_tokens} output tokens ({'streamed' if config.stream else 'not streamed'}); closed loop "
        f"with N x {config.batch_size} x {config.load_factor} requests in flight; throughput counted over "
        f"{config.measure:.0f} s after {config.warmup:.0f} s of warm-up. One saturated fast worker would "
        f"make {config.ideal_tokens_per_s(0):.0f} tok/s under this model.{slow} The latencies are chosen so "
        "the run is bound by the simulated GPUs, not by the 2 real cores (long steps, many tokens per "
        "request, a moderate request rate): the balancer's CPU column stays at a few % of one core. "
        "'machine CPU' is the whole machine, including other jobs that shared it during the run."
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            ScalingConfig, argv, prog="python -m bench.scaling", description=__doc__ or "",
            env_prefix="IB_SCALING_",
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    exit_on_sigterm()
    log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="ib-scaling-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(setup_text(config), file=sys.stderr)
    points = asyncio.run(measure_all(config, log_dir))
    text = tables(config, points)
    print(text)
    name = "scaling-heterogeneous" if config.heterogeneous else "scaling"
    if config.json:
        payload: dict[str, Any] = {"config": asdict(config), "points": [asdict(p) for p in points]}
        Path(config.json).write_text(json.dumps(payload, indent=2) + "\n")
    if config.results:
        plot_path = RESULTS_PATH.parent / f"{name}.png"
        counts = config.counts
        series = {
            policy: ([p.workers for p in points if p.policy == policy],
                     [p.tokens_per_s for p in points if p.policy == policy])
            for policy in config.policy
        }
        base = min((p.tokens_per_s / p.workers for p in points if p.workers == counts[0]), default=0.0)
        plot_lines(plot_path, f"{name}: throughput vs workers", "workers", "output tokens/s", series,
                   ideal=(counts, [base * n for n in counts]) if not config.heterogeneous else None)
        title = "Scaling, heterogeneous workers" if config.heterogeneous else "Scaling over simulated GPUs"
        body = f"{setup_text(config)}\n\n{text}\n\n![{name}]({plot_path.name})\n"
        write_section(name, title, body, command_line(argv, "bench.scaling"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
