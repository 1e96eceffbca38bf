"""`python -m bench.tail`: the latency tail at high concurrency, direct against through the balancer.

N simulated workers (`bench.stub_worker --delay`, a fixed service time and almost no CPU) and C concurrent
clients. The clients are the same both ways: N wrk processes of C/N connections each, aimed either one per
worker (direct: a perfect client-side spread) or all at the balancer (least_connections over the N). Direct
and balancer runs alternate; the median round is reported: req/s, p50, p99 and the balancer's CPU per
request. Per-wrk percentiles are combined as their mean (the N streams are alike); the worst is shown too.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.cluster import Process, exit_on_sigterm, free_port, start_balancer
from bench.results import command_line, markdown_table, write_section
from bench.wrk import WrkResult, ensure_wrk, run_wrk
from lb.settings import ConfigError, load_config, setting

BODY = b'{"model": "fake-model", "prompt": "hello", "max_tokens": 8}'


@dataclass(frozen=True)
class TailConfig:
    workers: int = setting(8, "simulated workers")
    delay: float = setting(0.1, "each worker's service time in seconds")
    connections: int = setting(
        256, "concurrent clients (keep-alive connections), split over the wrk processes"
    )
    duration: float = setting(10.0, "seconds per run")
    rounds: int = setting(3, "direct and balancer runs alternate this many times; the median round is shown")
    warmup: float = setting(2.0, "seconds of unmeasured load before the first run of each")
    balancer_args: tuple[str, ...] = setting((), "extra flags for `python -m lb`", metavar="FLAG")
    before: str | None = setting(
        None, "another checkout of the project: its balancer is measured too, alternating", metavar="DIR"
    )
    results: bool = setting(True, "write the table to bench/RESULTS.md")

    def __post_init__(self) -> None:
        if min(self.workers, self.rounds) < 1 or self.connections < self.workers or self.duration <= 0:
            raise ConfigError("workers and rounds must be >= 1, connections >= workers, duration > 0")


@dataclass
class Round:
    target: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    worst_p99_ms: float
    errors: int
    lb_cpu_us: float | None  # balancer CPU per request


def load(urls: Sequence[str], config: TailConfig, duration: float) -> list[WrkResult]:
    """One wrk per URL, all at once, C/N connections each."""
    per = config.connections // len(urls)
    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(lambda url: run_wrk(url + "/v1/completions", BODY, per, duration), urls))


def one_round(target: str, urls: Sequence[str], config: TailConfig, lb: Process | None) -> Round:
    cpu = psutil.Process(lb.pid) if lb is not None else None
    cpu0 = sum(cpu.cpu_times()[:2]) if cpu else 0.0
    results = load(urls, config, config.duration)
    requests = sum(r.requests for r in results)
    lb_cpu = (sum(cpu.cpu_times()[:2]) - cpu0) / requests * 1e6 if cpu and requests else None
    result = Round(
        target,
        sum(r.requests_per_s for r in results),
        statistics.mean(r.p50_ms for r in results),
        statistics.mean(r.p99_ms for r in results),
        max(r.p99_ms for r in results),
        sum(r.errors for r in results),
        lb_cpu,
    )
    print(f"  {target:<9} {result.requests_per_s:7.0f} req/s  p50 {result.p50_ms:.1f} ms  "
          f"p99 {result.p99_ms:.1f} ms (worst {result.worst_p99_ms:.1f})  errors {result.errors}",
          file=sys.stderr, flush=True)
    return result


def median(rounds: Sequence[Round], target: str) -> Round:
    ranked = sorted((r for r in rounds if r.target == target), key=lambda r: r.p99_ms)
    return ranked[(len(ranked) - 1) // 2]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(TailConfig, argv, prog="python -m bench.tail", description=__doc__ or "",
                             env_prefix="IB_TAIL_")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ensure_wrk()
    exit_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="ib-tail-"))
    workers: list[Process] = []
    balancers: list[Process] = []
    lb: Process | None = None
    try:
        urls = []
        for i in range(config.workers):
            port = free_port()
            args = [sys.executable, "-m", "bench.stub_worker", "--port", str(port),
                    "--delay", str(config.delay)]
            workers.append(Process(args, log_dir / f"worker-{i}.log", f"worker-{i}"))
            urls.append(f"http://127.0.0.1:{port}")
        for worker, url in zip(workers, urls, strict=True):
            worker.wait_ready(url + "/health")
        lb, lb_url = start_balancer(urls, "least_connections", log_dir / "lb.log", config.balancer_args)
        targets = {"direct": (urls, None), "balancer": ([lb_url] * config.workers, lb)}
        if config.before:
            old, old_url = start_balancer(urls, "least_connections", log_dir / "lb-before.log",
                                          config.balancer_args, code_dir=Path(config.before))
            balancers.append(old)
            targets["before"] = ([old_url] * config.workers, old)
        for target_urls, _ in targets.values():
            if config.warmup:
                load(target_urls, config, config.warmup)
        rounds = [one_round(name, target_urls, config, proc)
                  for _ in range(config.rounds) for name, (target_urls, proc) in targets.items()]
    finally:
        for proc in [lb, *balancers]:
            if proc is not None:
                proc.stop()
        for worker in workers:
            worker.stop()
    d, b = median(rounds, "direct"), median(rounds, "balancer")
    rows: list[list[object]] = [
        ["req/s", round(d.requests_per_s), round(b.requests_per_s),
         f"{b.requests_per_s / d.requests_per_s:.2f}x"],
        ["latency p50 (ms)", round(d.p50_ms, 1), round(b.p50_ms, 1), f"{b.p50_ms / d.p50_ms:.2f}x"],
        ["latency p99 (ms)", round(d.p99_ms, 1), round(b.p99_ms, 1), f"{b.p99_ms / d.p99_ms:.2f}x"],
        ["worst wrk's p99 (ms)", round(d.worst_p99_ms, 1), round(b.worst_p99_ms, 1), ""],
        ["balancer CPU per request (us)", "", round(b.lb_cpu_us or 0), ""],
        ["wrk errors", d.errors, b.errors, ""],
    ]
    headers = ["figure", "direct", "via balancer", "ratio"]
    if config.before:
        o = median(rounds, "before")
        extra = [round(o.requests_per_s), round(o.p50_ms, 1), round(o.p99_ms, 1), round(o.worst_p99_ms, 1),
                 round(o.lb_cpu_us or 0), o.errors]
        ratios = [f"{o.requests_per_s / d.requests_per_s:.2f}x", f"{o.p50_ms / d.p50_ms:.2f}x",
                  f"{o.p99_ms / d.p99_ms:.2f}x", "", "", ""]
        rows = [[*row, value, ratio] for row, value, ratio in zip(rows, extra, ratios, strict=True)]
        headers += ["via balancer before (--before)", "ratio before"]
    text = markdown_table(headers, rows)
    every = "; ".join(f"{r.target} p99 {r.p99_ms:.1f} ms" for r in rounds)
    text += f"\n\nEvery round, in order: {every}. Target: balancer p99 within 1.1x of direct."
    print(text)
    if config.results:
        setup = (
            f"{config.workers} `bench.stub_worker --delay {config.delay:g}` workers, {config.connections} "
            f"connections from {config.workers} wrk processes ({config.connections // config.workers} each), "
            f"{config.duration:g} s per run, {config.rounds} alternating rounds, median round by p99; "
            "balancer policy least_connections. wrk, the workers and the balancer share the machine's cores."
        )
        write_section("tail", "Latency tail at high concurrency (wrk)", f"{setup}\n\n{text}",
                      command_line(argv, "bench.tail"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
