"""`python -m bench.dashboard_cost`: what an open dashboard costs the balancer, measured with wrk.

bench.overhead's load (wrk, non-streamed completions, fake-engine workers) runs through the balancer with the
dashboard open in headless Chromium and /cluster polled every second, and without (the same browser on
about:blank, no polling); the two alternate so a slow spell of the shared machine hits both. Reported: the
median round's req/s and the balancer's CPU per request. Target: the page costs under 5% of throughput. A
screenshot of the page under this load is saved for the README.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.browser import start_chromium
from bench.cluster import Process, exit_on_sigterm, start_balancer
from bench.overhead import OverheadConfig, body, cpu_seconds, start_upstream
from bench.results import BENCH_DIR, command_line, markdown_table, write_section
from bench.wrk import ensure_wrk, run_wrk
from lb.settings import ConfigError, load_config, setting


@dataclass(frozen=True)
class DashboardCostConfig:
    duration: float = setting(6.0, "seconds per wrk run")
    rounds: int = setting(3, "with and without the dashboard alternate this many times; the median is shown")
    warmup: float = setting(2.0, "seconds of unmeasured load before the first run")
    connections: int = setting(32, "wrk connections")
    workers: int = setting(2, "fake-engine workers behind the balancer")
    max_tokens: int = setting(8, "tokens per request")
    poll_interval: float = setting(1.0, "seconds between GET /cluster polls while the dashboard is open")
    screenshot: str | None = setting(
        str(BENCH_DIR / "dashboard.png"), "save the page under load to this PNG (none: no screenshot)"
    )
    results: bool = setting(True, "write the table to bench/RESULTS.md")

    def __post_init__(self) -> None:
        if (
            self.duration <= 0
            or min(self.rounds, self.connections, self.workers) < 1
            or self.poll_interval <= 0
        ):
            raise ConfigError("duration, rounds, connections, workers and poll_interval must be positive")


@dataclass
class Run:
    dashboard: bool
    requests_per_s: float
    lb_cpu_us_per_request: float
    errors: int


class Poller:
    """GET /cluster every `interval` seconds on a thread, as a second open tab or a script would."""

    def __init__(self, url: str, interval: float) -> None:
        self._url = url
        self._interval = interval
        self._stop = threading.Event()
        self.polls = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with urllib.request.urlopen(self._url + "/cluster", timeout=5) as resp:
                resp.read()
            self.polls += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def measure(config: DashboardCostConfig, lb: Process, lb_url: str, chrome: Any) -> list[Run]:
    url = lb_url + "/v1/completions"
    data = body(config.max_tokens, False)
    if config.warmup:
        run_wrk(url, data, config.connections, config.warmup)
    runs: list[Run] = []
    for round_no in range(config.rounds):
        for dashboard in (False, True):
            chrome.get(lb_url + "/dashboard" if dashboard else "about:blank")
            poller = Poller(lb_url, config.poll_interval) if dashboard else None
            shot = None
            if dashboard and config.screenshot and round_no == config.rounds - 1:
                shot = threading.Timer(config.duration * 0.7, chrome.save_screenshot, [config.screenshot])
                shot.start()
            before = cpu_seconds(lb)
            result = run_wrk(url, data, config.connections, config.duration)
            cpu = cpu_seconds(lb) - before
            if poller is not None:
                poller.stop()
            if shot is not None:
                shot.join()
            runs.append(
                Run(dashboard, result.requests_per_s, cpu / max(1, result.requests) * 1e6, result.errors)
            )
            print(
                f"  round {round_no + 1} dashboard {'open  ' if dashboard else 'closed'} "
                f"{result.requests_per_s:8.0f} req/s  {runs[-1].lb_cpu_us_per_request:6.0f} us CPU/request  "
                f"errors {result.errors}",
                file=sys.stderr,
                flush=True,
            )
    return runs


def table(runs: Sequence[Run]) -> str:
    def median(dashboard: bool, key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in runs if r.dashboard == dashboard))

    closed, opened = median(False, "requests_per_s"), median(True, "requests_per_s")
    cpu_closed, cpu_opened = median(False, "lb_cpu_us_per_request"), median(True, "lb_cpu_us_per_request")
    rows: list[list[object]] = [
        ["req/s through the balancer", round(closed), round(opened), f"{opened / closed:.3f}x"],
        [
            "balancer CPU per request (us)",
            round(cpu_closed),
            round(cpu_opened),
            f"{cpu_opened / cpu_closed:.3f}x",
        ],
    ]
    cost = 1 - opened / closed
    text = markdown_table(
        ["figure", "dashboard closed", "dashboard open + /cluster every 1 s", "ratio"], rows
    )
    spread = ", ".join(f"{r.requests_per_s:.0f}{' (open)' if r.dashboard else ''}" for r in runs)
    text += f"\n\nEvery round's req/s, in order: {spread}. wrk errors: {sum(r.errors for r in runs)}."
    text += (
        f"\n\nTarget: the page costs under 5% of throughput: {cost:+.1%} "
        f"({'met' if cost < 0.05 else 'missed'})."
    )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            DashboardCostConfig,
            argv,
            prog="python -m bench.dashboard_cost",
            description=__doc__ or "",
            env_prefix="IB_DASHBOARD_COST_",
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ensure_wrk()
    exit_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="ib-dashboard-cost-"))
    upstream_config = OverheadConfig(max_tokens=config.max_tokens)
    upstreams = [start_upstream("fake", upstream_config, log_dir) for _ in range(config.workers)]
    try:
        lb, lb_url = start_balancer([url for _, url in upstreams], "least_connections", log_dir / "lb.log")
        chrome = start_chromium()
        try:
            runs = measure(config, lb, lb_url, chrome)
        finally:
            chrome.quit()
            lb.stop()
    finally:
        for proc, _ in upstreams:
            proc.stop()
    text = table(runs)
    print(text)
    if config.screenshot:
        print(f"screenshot: {config.screenshot}", file=sys.stderr)
    if config.results:
        setup = (
            f"{config.workers} fake-engine workers (batch {upstream_config.worker_batch_size}, no batching "
            f"wait) behind one balancer (least_connections, telemetry every 2 s); wrk, one thread, "
            f"{config.connections} connections, {config.duration:g} s per run, non-streamed completions "
            f"of {config.max_tokens} tokens. Closed: headless Chromium on about:blank. Open: the same "
            f"Chromium on /dashboard (it polls /cluster every 2 s) plus GET /cluster every "
            f"{config.poll_interval:g} s from another thread. The two alternate; each cell is the median "
            "of its rounds. wrk, the balancer, the workers and Chromium share the machine's 2 cores with "
            "other jobs, so single rounds swing by several percent: read the spread below the table."
        )
        write_section(
            "dashboard",
            "Dashboard cost (wrk, dashboard open vs closed)",
            f"{setup}\n\n{text}",
            command_line(argv, "bench.dashboard_cost"),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
