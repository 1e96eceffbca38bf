"""`python -m bench.soak`: the balancer under long load, under worker crashes, and beside slow clients.

Three modes, each against fake-engine workers behind `python -m lb` on this machine:
- soak: `--requests` (100,000) at `--concurrency` (256) through `--workers` (4): errors; the balancer's RSS
  growth from after a warm-up to after the run; its open file descriptors before any load and after the run
  once idle connections expired. Targets: 0 errors, < 20 MB growth, fds back to their starting count.
- chaos: `--chaos-concurrency` (64) clients, a quarter of them streaming, for `--chaos-duration` (60 s) while
  one worker is SIGKILLed and restarted every `--kill-every` (5 s). Target: 0 failed non-streaming requests;
  streams cut mid-way are counted (they end with an SSE error event).
- slowloris: normal load for `--slow-duration` s, once alone and once beside `--slow-connections` (1,000)
  connections trickling request heads a byte a second. Target: normal requests' p99 within 1.5x.
Results go to bench/RESULTS.md (section `soak`) unless --no-results. Exits 1 when a target is missed.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.client import LoadRun, LoadSpec, run_load
from bench.cluster import ClusterSpec, LocalCluster, Process, WorkerSpec, exit_on_sigterm
from bench.results import command_line, markdown_table, write_section
from lb.settings import ConfigError, load_config, setting
from lb.upstream import IDLE_TTL

MODES = ("soak", "chaos", "slowloris")
RSS_GROWTH_TARGET_MB = 20.0
P99_RATIO_TARGET = 1.5
SLOWLORIS_RAMP_S = 4.0  # seconds for the slowloris process to open its connections before the load starts
FD_SETTLE_S = 1.5 * IDLE_TTL + 10  # seconds the soak waits for open fds to come back after its run


@dataclass(frozen=True)
class SoakConfig:
    modes: tuple[str, ...] = setting(MODES, "which runs, comma separated", metavar="MODE[,MODE...]")
    workers: int = setting(4, "fake-engine workers behind the balancer")
    requests: int = setting(100_000, "soak: requests to send")
    concurrency: int = setting(256, "soak: requests in flight")
    warmup: int = setting(2_000, "soak: requests before the baseline RSS and fd count are taken")
    max_tokens: int = setting(8, "tokens per request (the fake engine makes them instantly)")
    chaos_concurrency: int = setting(64, "chaos: requests in flight (a quarter of them streamed)")
    chaos_duration: float = setting(60.0, "chaos: seconds of load while workers are killed")
    kill_every: float = setting(5.0, "chaos: seconds between two SIGKILLs (each worker restarted at once)")
    step_latency: float = setting(0.01, "chaos and slowloris: the fake engine's seconds per token")
    slow_connections: int = setting(1_000, "slowloris: trickling connections")
    slow_duration: float = setting(30.0, "slowloris: seconds of normal load per run (with and without)")
    slow_concurrency: int = setting(32, "slowloris: normal requests in flight")
    lb_args: str = setting("", "extra `python -m lb` flags, e.g. '--header-timeout 10'")
    results: bool = setting(True, "write the figures to bench/RESULTS.md")

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in MODES:
                raise ConfigError(f"modes: {mode!r} is not one of {', '.join(MODES)}")
        if min(self.workers, self.requests, self.concurrency, self.chaos_concurrency) < 1:
            raise ConfigError("workers, requests, concurrency and chaos_concurrency must be >= 1")


@dataclass
class Report:
    rows: list[list[object]] = field(default_factory=list)  # figure, measured, target, met
    notes: list[str] = field(default_factory=list)

    def check(self, figure: str, value: object, target: str, met: bool) -> None:
        self.rows.append([figure, value, target, "yes" if met else "**no**"])

    @property
    def met(self) -> bool:
        return all(row[3] == "yes" for row in self.rows)


def cluster_spec(config: SoakConfig, step_latency: float, log_dir: Path) -> ClusterSpec:
    worker = WorkerSpec(step_latency=step_latency, batch_size=64, extra_args=("--log-level", "warning"))
    lb_args = ("--health-check-interval", "0.5", "--log-level", "warning", *config.lb_args.split())
    return ClusterSpec(workers=(worker,) * config.workers, lb_args=lb_args, log_dir=log_dir)


def spec(url: str, config: SoakConfig, **fields: object) -> LoadSpec:
    base: dict[str, object] = {"url": url, "endpoint": "chat", "max_tokens": config.max_tokens}
    base["prompt_len"] = 8
    return LoadSpec(**(base | fields))  # type: ignore[arg-type]


def usage(proc: psutil.Process) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of the balancer."""
    return proc.memory_info().rss / 2**20, proc.num_fds()


async def soak(config: SoakConfig, log_dir: Path, report: Report) -> None:
    with LocalCluster(cluster_spec(config, 0.0, log_dir / "soak")) as cluster:
        assert cluster.balancer is not None
        lb = psutil.Process(cluster.balancer.pid)
        fds0 = usage(lb)[1]  # before any load: listening socket, log, probe connections
        warmup = spec(cluster.lb_url, config, concurrency=config.concurrency, num_requests=config.warmup)
        await run_load(warmup)
        await asyncio.sleep(1.0)
        rss0 = usage(lb)[0]  # after a warm-up: the allocator's and the pools' first growth is not a leak
        peak = [rss0]

        async def sample() -> None:
            while True:
                await asyncio.sleep(1.0)
                peak.append(usage(lb)[0])

        sampler = asyncio.create_task(sample())
        run = await run_load(spec(cluster.lb_url, config, concurrency=config.concurrency,
                                  num_requests=config.requests))  # fmt: skip
        sampler.cancel()
        ended = time.monotonic()
        while True:  # client connections close at once; idle upstream ones after IDLE_TTL (lb/upstream.py)
            await asyncio.sleep(1.0)
            rss1, fds1 = usage(lb)
            settled = time.monotonic() - ended
            if fds1 <= fds0 or settled > FD_SETTLE_S:
                break
    s = run.summary
    report.notes.append(
        f"soak: {s.requests:,} requests at concurrency {config.concurrency} through {config.workers} workers "
        f"in {s.wall_time_s:.0f} s ({s.requests_per_s:.0f} req/s, p50 {s.latency_ms_p50:.1f} ms, p99 "
        f"{s.latency_ms_p99:.1f} ms); RSS {rss0:.1f} MB after warm-up, {rss1:.1f} MB after, peak "
        f"{max(peak):.1f} MB; open fds {fds0} before any load, {fds1} {settled:.0f} s after the run (idle "
        f"upstream connections close after {IDLE_TTL:g} s)"
    )
    report.check("soak: errors", f"{s.errors} of {s.requests:,} {dict(s.errors_by_kind)}", "0", s.errors == 0)
    growth = rss1 - rss0
    report.check("soak: balancer RSS growth", f"{growth:+.1f} MB", f"< {RSS_GROWTH_TARGET_MB:g} MB",
                 growth < RSS_GROWTH_TARGET_MB)  # fmt: skip
    report.check("soak: open fds after vs. before", f"{fds1} vs {fds0}", "back to start", fds1 <= fds0)


async def chaos(config: SoakConfig, log_dir: Path, report: Report) -> None:
    with LocalCluster(cluster_spec(config, config.step_latency, log_dir / "chaos")) as cluster:
        streamed = max(1, config.chaos_concurrency // 4)
        plain = spec(cluster.lb_url, config, concurrency=config.chaos_concurrency - streamed,
                     num_requests=None, duration=config.chaos_duration)  # fmt: skip
        streams = spec(cluster.lb_url, config, concurrency=streamed, num_requests=None, stream=True,
                       duration=config.chaos_duration, max_tokens=config.max_tokens * 4)  # fmt: skip
        killer = asyncio.create_task(kill_and_restart(cluster, config))
        plain_run, stream_run = await asyncio.gather(run_load(plain), run_load(streams))
        kills = await killer
    failed = [r for r in plain_run.results if not r.ok]
    cut = [r for r in stream_run.results if not r.ok]
    kinds = sorted({r.error_kind or "" for r in cut})
    report.notes.append(
        f"chaos: {kills} SIGKILLs in {config.chaos_duration:g} s (each worker restarted on its port at "
        f"once); {len(plain_run.results):,} non-streaming and {len(stream_run.results):,} streaming requests "
        f"at concurrency {config.chaos_concurrency}; {len(cut)} streams cut ({', '.join(kinds) or 'none'})"
    )
    report.check("chaos: failed non-streaming requests", f"{len(failed)} of {len(plain_run.results):,}", "0",
                 not failed)  # fmt: skip
    report.check("chaos: streams cut mid-way", f"{len(cut)} of {len(stream_run.results):,}", "counted", True)


async def kill_and_restart(cluster: LocalCluster, config: SoakConfig) -> int:
    """SIGKILL worker 0, 1, 2, ... in turn every `kill_every` s and start it again on the same port."""
    kills = 0
    end = time.monotonic() + config.chaos_duration
    while True:
        await asyncio.sleep(config.kill_every)
        if time.monotonic() >= end:
            return kills
        index = kills % len(cluster.workers)
        victim = cluster.workers[index]
        victim.popen.kill()
        await asyncio.to_thread(victim.popen.wait)
        kills += 1
        restarted = Process(victim.args, victim.log_path.with_suffix(f".{kills}.log"), victim.name)
        cluster.workers[index] = restarted


async def slowloris(config: SoakConfig, log_dir: Path, report: Report) -> None:
    with LocalCluster(cluster_spec(config, config.step_latency, log_dir / "slowloris")) as cluster:
        load = spec(cluster.lb_url, config, concurrency=config.slow_concurrency, num_requests=None,
                    duration=config.slow_duration)  # fmt: skip
        alone = await run_load(load)
        port = cluster.lb_url.rsplit(":", 1)[1]
        argv = [sys.executable, "-m", "bench.slowloris", "--port", port, "--connections",
                str(config.slow_connections)]  # fmt: skip
        attack = Process(argv, log_dir / "slowloris.log", "slowloris")  # its own loop, not the client's
        await asyncio.sleep(SLOWLORIS_RAMP_S)
        beside = await run_load(load)
        await asyncio.to_thread(attack.stop)
        stats = json.loads(attack.log_path.read_text().strip().splitlines()[-1])
    p99_alone, p99_beside = alone.summary.latency_ms_p99 or 0.0, beside.summary.latency_ms_p99 or 0.0
    ratio = p99_beside / p99_alone if p99_alone else float("inf")
    report.notes.append(
        f"slowloris: {config.slow_concurrency} normal clients for {config.slow_duration:g} s, p50/p99 "
        f"{fmt(alone)} alone and {fmt(beside)} beside {config.slow_connections:,} trickling connections "
        f"(a separate process; peak {stats['peak_open']} open at once, {stats['cut_by_server']} cut by the "
        f"balancer and reopened, {stats['refused']} refused); errors {alone.summary.errors} and "
        f"{beside.summary.errors}"
    )
    report.check("slowloris: normal p99 beside / alone", f"{ratio:.2f}x", f"<= {P99_RATIO_TARGET:g}x",
                 ratio <= P99_RATIO_TARGET and beside.summary.errors == 0)  # fmt: skip


def fmt(run: LoadRun) -> str:
    return f"{run.summary.latency_ms_p50 or 0:.1f}/{run.summary.latency_ms_p99 or 0:.1f} ms"


def raise_fd_limit(needed: int) -> None:
    """Room for the slowloris connections in this process and (inherited) in the balancer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


RUNS = {"soak": soak, "chaos": chaos, "slowloris": slowloris}
SECTIONS = {  # one RESULTS.md section per mode, so that one mode can be run again alone
    "soak": ("soak", "Soak: 100,000 requests"),
    "chaos": ("soak-chaos", "Chaos: workers SIGKILLed under load"),
    "slowloris": ("soak-slowloris", "Slowloris beside normal load"),
}


async def run_modes(config: SoakConfig, log_dir: Path) -> dict[str, Report]:
    reports: dict[str, Report] = {}
    for mode in config.modes:
        print(f"[soak] {mode} ...", file=sys.stderr, flush=True)
        reports[mode] = Report()
        await RUNS[mode](config, log_dir, reports[mode])
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(SoakConfig, argv, prog="python -m bench.soak", description=__doc__ or "",
                             env_prefix="IB_SOAK_")  # fmt: skip
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    exit_on_sigterm()
    raise_fd_limit(4 * config.slow_connections + 4096)
    log_dir = Path(f"/tmp/ib-soak-{int(time.time())}")
    reports = asyncio.run(run_modes(config, log_dir))
    for mode, report in reports.items():
        body = "\n\n".join(
            ["\n".join(f"- {note}" for note in report.notes),
             markdown_table(["figure", "measured", "target", "met"], report.rows),
             "Client, balancer and workers share the machine's 2 cores with other jobs: figures are noisy."]
        )  # fmt: skip
        print(body + "\n")
        if config.results:
            name, title = SECTIONS[mode]
            write_section(name, title, body, command_line(argv, "bench.soak"))
    print(f"(logs in {log_dir})", file=sys.stderr)
    return 0 if all(report.met for report in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
