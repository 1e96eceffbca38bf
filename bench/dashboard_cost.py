"""`python -m bench.dashboard_cost`: what an open dashboard costs the balancer, measured with wrk.

bench.overhead's load (wrk, non-streamed completions, fake-engine workers) runs through the balancer in three
modes that alternate, so a slow spell of the shared machine hits all of them: closed (headless Chromium on
about:blank), polled (GET /cluster every second, no page) and open (the page in Chromium, which polls /cluster
itself, plus the same 1 s poll). Reported: the median round's req/s, the balancer's CPU per request and the
browser's own CPU (here it shares the balancer's cores; on a laptop it would not). Target: the page costs the
balancer under 5% of its CPU per request. A screenshot of the page under this load is saved for the README.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.browser import start_chromium
from bench.cluster import Process, exit_on_sigterm, start_balancer
from bench.overhead import OverheadConfig, body, cpu_seconds, start_upstream
from bench.results import BENCH_DIR, command_line, markdown_table, write_section
from bench.wrk import ensure_wrk, run_wrk
from lb.settings import ConfigError, load_config, setting


@dataclass(frozen=True)
class DashboardCostConfig:
    duration: float = setting(5.0, "seconds per wrk run")
    rounds: int = setting(4, "the three modes alternate this many times; each cell is the median")
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


MODES = {
    "closed": "dashboard closed",
    "polled": "/cluster every 1 s, no page",
    "open": "page open + /cluster every 1 s",
}


@dataclass
class Run:
    mode: str  # a key of MODES
    requests_per_s: float
    lb_cpu_us_per_request: float
    browser_cpu_ms_per_s: float  # Chromium (all its processes) during the run: it shares our 2 cores
    errors: int


def browser_cpu_seconds(chrome: Any) -> float:
    """CPU seconds of chromedriver's whole process tree (the browser, its renderer and GPU processes)."""
    total = 0.0
    root = psutil.Process(chrome.service.process.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


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


def screenshot(chrome: Any, path: str) -> None:
    """The page as a user sees it under load, with a streamed reply in the playground."""
    chrome.find_element("css selector", "#pg-send").click()
    time.sleep(1.5)
    chrome.save_screenshot(path)


def cluster_cpu_ms(lb: Process, lb_url: str, calls: int = 300) -> float:
    """The balancer's CPU milliseconds per GET /cluster, from `calls` sequential requests (no other load)."""
    before = cpu_seconds(lb)
    for _ in range(calls):
        with urllib.request.urlopen(lb_url + "/cluster", timeout=5) as resp:
            resp.read()
    return (cpu_seconds(lb) - before) / calls * 1000


def measure(config: DashboardCostConfig, lb: Process, lb_url: str, chrome: Any) -> list[Run]:
    url = lb_url + "/v1/completions"
    data = body(config.max_tokens, False)
    if config.warmup:
        run_wrk(url, data, config.connections, config.warmup)
    runs: list[Run] = []
    for round_no in range(config.rounds):
        for mode in MODES:
            chrome.get(lb_url + "/dashboard" if mode == "open" else "about:blank")
            poller = Poller(lb_url, config.poll_interval) if mode != "closed" else None
            shot = None
            if mode == "open" and config.screenshot and round_no == config.rounds - 1:
                shot = threading.Timer(config.duration * 0.6, screenshot, [chrome, config.screenshot])
                shot.start()
            before, browser_before = cpu_seconds(lb), browser_cpu_seconds(chrome)
            result = run_wrk(url, data, config.connections, config.duration)
            cpu = cpu_seconds(lb) - before
            browser = (browser_cpu_seconds(chrome) - browser_before) / config.duration * 1000
            if poller is not None:
                poller.stop()
            if shot is not None:
                shot.join()
            per_request = cpu / max(1, result.requests) * 1e6
            runs.append(Run(mode, result.requests_per_s, per_request, browser, result.errors))
            print(
                f"  round {round_no + 1} {mode:<7} {result.requests_per_s:8.0f} req/s  {per_request:6.0f} us "
                f"CPU/request  browser {browser:5.0f} ms/s  errors {result.errors}",
                file=sys.stderr,
                flush=True,
            )
    return runs


def table(runs: Sequence[Run]) -> str:
    def median(mode: str, key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in runs if r.mode == mode))

    rows: list[list[object]] = []
    for label, key, unit in (
        ("req/s through the balancer", "requests_per_s", 1),
        ("balancer CPU per request (us)", "lb_cpu_us_per_request", 1),
        ("Chromium CPU (ms per s)", "browser_cpu_ms_per_s", 1),
    ):
        base = median("closed", key)
        cells = [round(median(mode, key) * unit) for mode in MODES]
        ratios = [f"{median(mode, key) / base:.3f}x" if base else "" for mode in ("polled", "open")]
        rows.append([label, *cells, " / ".join(ratios)])
    text = markdown_table(["figure", *MODES.values(), "ratio polled / open"], rows)
    spread = "; ".join(
        f"{mode} " + ", ".join(f"{r.requests_per_s:.0f}" for r in runs if r.mode == mode) for mode in MODES
    )
    text += f"\n\nEvery round's req/s: {spread}. wrk errors: {sum(r.errors for r in runs)}."
    polled = median("polled", "lb_cpu_us_per_request") / median("closed", "lb_cpu_us_per_request") - 1
    opened = median("open", "lb_cpu_us_per_request") / median("closed", "lb_cpu_us_per_request") - 1
    text += (
        f"\n\nTarget: the page costs under 5% (balancer CPU per proxied request): polled {polled:+.1%}, page "
        f"open {opened:+.1%} ({'met' if max(polled, opened) < 0.05 else 'missed'})."
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
            per_call = cluster_cpu_ms(lb, lb_url)  # after the load: /cluster then holds 1-2 min of history
        finally:
            chrome.quit()
            lb.stop()
    finally:
        for proc, _ in upstreams:
            proc.stop()
    text = table(runs)
    closed_cpu_per_s = statistics.median(
        r.lb_cpu_us_per_request * r.requests_per_s / 1e6 for r in runs if r.mode == "closed"
    )
    polls_per_s = 1 / config.poll_interval + 0.5  # the poller, and the page's own poll every 2 s
    text += (
        f"\n\nOne GET /cluster costs the balancer {per_call:.2f} ms of CPU (300 sequential calls after the "
        f"load); at {polls_per_s:g} per second that is {per_call * polls_per_s:.1f} ms/s, "
        f"{per_call * polls_per_s / 1000 / closed_cpu_per_s:.1%} of the CPU the balancer spent per second "
        "under this load with the page closed."
    )
    print(text)
    if config.screenshot:
        print(f"screenshot: {config.screenshot}", file=sys.stderr)
    if config.results:
        setup = (
            f"{config.workers} fake-engine workers (batch {upstream_config.worker_batch_size}, no batching "
            f"wait) behind one balancer (least_connections, telemetry every 2 s); wrk, one thread, "
            f"{config.connections} connections, {config.duration:g} s per run, non-streamed completions "
            f"of {config.max_tokens} tokens. Closed: headless Chromium on about:blank. Polled: GET /cluster "
            f"every {config.poll_interval:g} s from another thread. Open: Chromium on /dashboard (it polls "
            "/cluster every 2 s) plus that poll. The modes alternate; each cell is the median of its "
            f"{config.rounds} rounds. wrk, the balancer, the workers and Chromium share the machine's 2 "
            "cores with other jobs, so single rounds swing by 10-20%: read the spread below the table."
        )
        write_section(
            "dashboard",
            "Dashboard cost (wrk: page closed, /cluster polled, page open)",
            f"{setup}\n\n{text}",
            command_line(argv, "bench.dashboard_cost"),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
