"""`python -m bench.overhead`: what the balancer adds over going straight to the upstream, measured with wrk.

Two upstreams, each on its own: `fake` is a real worker with the fake engine and no simulated latency (what
the issue asks for; its own per-request cost, an engine-thread hand-off, dominates), `stub` is
`bench.stub_worker`, a bare asyncio server with canned answers, so the balancer's own cost shows. wrk (C,
one thread) loads the upstream directly, then a balancer in front of it, with the same POST body. Reported:
latency p50/p99 at concurrency 1 and 64 and the added latency, req/s at 64, SSE events/s at 64 (each
streamed response has a fixed number of events, counted once), and the balancer's CPU per request.
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.cluster import Process, WorkerSpec, exit_on_sigterm, free_port, start_balancer
from bench.profile import self_time, start_recording
from bench.results import command_line, markdown_table, write_section
from bench.wrk import WrkResult, ensure_wrk, run_wrk
from lb.settings import ConfigError, load_config, setting


@dataclass(frozen=True)
class OverheadConfig:
    duration: float = setting(5.0, "seconds per wrk run")
    rounds: int = setting(3, "direct and balancer runs alternate this many times; the median round is shown")
    warmup: float = setting(2.0, "seconds of unmeasured load before each run")
    high_concurrency: int = setting(64, "connections for the throughput runs")
    max_tokens: int = setting(8, "tokens per non-streamed request (small: the worker's own cost stays low)")
    stream_tokens: int = setting(128, "tokens per streamed request (one SSE event each)")
    worker_batch_size: int = setting(64, "the fake worker's batch size")
    threads: int = setting(1, "wrk threads (one keeps wrk to one of the two cores)")
    upstream: tuple[str, ...] = setting(
        ("fake", "stub"), "upstreams to measure: fake (worker, fake engine) and/or stub (bench.stub_worker)"
    )
    py_spy: str | None = setting(
        None, "a py-spy binary: profile the balancer during the high-concurrency runs (bench/profile.py)"
    )
    before: str | None = setting(
        None,
        "another checkout of the project (e.g. `git worktree add /tmp/before COMMIT`): its balancer is "
        "measured too, alternating with this one in the same run, and the table gains its columns",
        metavar="DIR",
    )
    results: bool = setting(True, "write the table to bench/RESULTS.md")
    json: str | None = setting(None, "write every run to this JSON file")

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.warmup < 0 or min(self.high_concurrency, self.threads, self.rounds) < 1:
            raise ConfigError("duration, high_concurrency and threads must be positive, warmup >= 0")
        unknown = set(self.upstream) - {"fake", "stub"}
        if unknown or not self.upstream:
            raise ConfigError(f"upstream: choose from fake, stub (got {', '.join(self.upstream) or 'none'})")


@dataclass
class Run:
    target: str  # "direct" or "balancer"
    scenario: str  # e.g. "c1", "c64", "c64-stream"
    connections: int
    result: WrkResult
    lb_cpu_s: float | None  # balancer CPU seconds during the run
    worker_cpu_s: float  # upstream CPU seconds during the run
    profile: list[tuple[float, str]] | None = None  # balancer self time by function (share of samples)


def body(tokens: int, stream: bool) -> bytes:
    payload: dict[str, Any] = {"model": "fake-model", "prompt": "hello world", "max_tokens": tokens,
                               "ignore_eos": True, "stream": stream}
    return json.dumps(payload).encode()


def sse_events(url: str, data: bytes) -> int:
    """How many `data:` events one streamed response holds (including the final [DONE])."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return sum(1 for line in resp.read().splitlines() if line.startswith(b"data:"))


def cpu_seconds(proc: Process | None) -> float:
    if proc is None:
        return 0.0
    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)


def measure(
    config: OverheadConfig,
    upstream: Process,
    upstream_url: str,
    balancers: dict[str, tuple[str, Process]],
) -> list[Run]:
    hi = config.high_concurrency
    scenarios = [
        ("c1", 1, body(config.max_tokens, False)),
        (f"c{hi}", hi, body(config.max_tokens, False)),
        (f"c{hi}-stream", hi, body(config.stream_tokens, True)),
    ]
    targets: dict[str, tuple[str, Process | None]] = {"direct": (upstream_url, None), **balancers}
    runs: list[Run] = []
    for scenario, connections, data in scenarios:
        # direct and balancer alternate, so a slow spell of the shared machine hits both
        for round_no in range(config.rounds):
            for target, (base, proc) in targets.items():
                url = base + "/v1/completions"
                if config.warmup and round_no == 0:
                    run_wrk(url, data, connections, config.warmup, config.threads)
                lb0, w0 = cpu_seconds(proc), cpu_seconds(upstream)
                result = run_wrk(url, data, connections, config.duration, config.threads)
                lb_cpu = cpu_seconds(proc) - lb0 if proc else None
                runs.append(Run(target, scenario, connections, result, lb_cpu, cpu_seconds(upstream) - w0))
                print(f"  {scenario:<12} {target:<9} {result.requests_per_s:9.0f} req/s  "
                      f"p50 {result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  errors {result.errors}",
                      file=sys.stderr, flush=True)
        if config.py_spy and connections > 1:
            lb_url, lb = balancers["balancer"]
            median(runs, "balancer", scenario).profile = profile_run(
                config, config.py_spy, lb, lb_url + "/v1/completions", data, connections
            )
    return runs


def median(runs: Sequence[Run], target: str, scenario: str) -> Run:
    """The round with the median req/s (its latencies and CPU stay consistent with each other)."""
    rounds = sorted((r for r in runs if r.target == target and r.scenario == scenario),
                    key=lambda r: r.result.requests_per_s)
    return rounds[(len(rounds) - 1) // 2]


def profile_run(
    config: OverheadConfig, py_spy: str, proc: Process, url: str, data: bytes, connections: int
) -> list[tuple[float, str]] | None:
    """A second, unmeasured run with py-spy attached: sampling costs CPU, which must not skew the figures."""
    raw = Path(tempfile.mkdtemp(prefix="ib-pyspy-")) / "stacks.txt"
    recorder = start_recording(py_spy, proc.pid, config.duration - 1, raw)
    run_wrk(url, data, connections, config.duration, config.threads)
    recorder.wait(timeout=60)
    return self_time(raw)[1] if raw.exists() else None


def table(config: OverheadConfig, runs: Sequence[Run], events: int) -> str:
    def get(target: str, scenario: str) -> Run:
        return median(runs, target, scenario)

    hi = f"c{config.high_concurrency}"
    targets = ["balancer"] + (["before"] if any(r.target == "before" for r in runs) else [])
    rows: list[list[object]] = []

    def row(label: str, scenario: str, value: Any, compare: Any) -> None:
        d = get("direct", scenario)
        cells: list[object] = [label, value(d)]
        for target in targets:
            b = get(target, scenario)
            cells += [value(b), compare(d, b)]
        rows.append(cells)

    for scenario, label in (("c1", "concurrency 1"), (hi, f"concurrency {config.high_concurrency}")):
        row(f"latency p50, {label} (ms)", scenario, lambda r: r.result.p50_ms,
            lambda d, b: f"{b.result.p50_ms - d.result.p50_ms:+.3f} ms")
        row(f"latency p99, {label} (ms)", scenario, lambda r: r.result.p99_ms,
            lambda d, b: f"{b.result.p99_ms - d.result.p99_ms:+.3f} ms")
    row(f"req/s, concurrency {config.high_concurrency}", hi, lambda r: round(r.result.requests_per_s),
        lambda d, b: f"{b.result.requests_per_s / d.result.requests_per_s:.2f}x")
    row(f"SSE events/s, concurrency {config.high_concurrency}", hi + "-stream",
        lambda r: round(r.result.requests_per_s * events),
        lambda d, b: f"{b.result.requests_per_s / d.result.requests_per_s:.2f}x")
    for scenario in ("c1", hi, hi + "-stream"):
        if get("direct", scenario).result.requests and all(
            get(t, scenario).lb_cpu_s is not None and get(t, scenario).result.requests for t in targets
        ):
            row(f"CPU per request, {scenario} (us): upstream direct / balancer", scenario,
                lambda r: round((r.lb_cpu_s if r.lb_cpu_s is not None else r.worker_cpu_s)
                                / r.result.requests * 1e6),
                lambda d, b: "")
    d, b = get("direct", hi).result, get("balancer", hi).result
    ds, bs = get("direct", hi + "-stream").result, get("balancer", hi + "-stream").result
    headers = ["figure", "direct", "via balancer", "added / ratio"]
    if "before" in targets:
        headers += ["via balancer before (--before)", "added / ratio before"]
    errors = sum(r.result.errors for r in runs)
    text = markdown_table(headers, rows)
    text += f"\n\nwrk errors (connect, read, write, non-2xx, timeout) over all runs: {errors}."
    c1_d, c1_b = get("direct", "c1").result, get("balancer", "c1").result
    checks = [
        ("added p50 at concurrency 1 <= 0.25 ms", c1_b.p50_ms - c1_d.p50_ms <= 0.25,
         f"{c1_b.p50_ms - c1_d.p50_ms:.3f} ms"),
        ("req/s >= 0.35 of direct", b.requests_per_s >= 0.35 * d.requests_per_s,
         f"{b.requests_per_s / d.requests_per_s:.2f}"),
        ("SSE events/s >= 0.9 of direct", bs.requests_per_s >= 0.9 * ds.requests_per_s,
         f"{bs.requests_per_s / ds.requests_per_s:.2f}"),
    ]
    text += "\n\nIssue 3 targets: " + "; ".join(
        f"{name}: {value} ({'met' if ok else 'missed'})" for name, ok, value in checks
    ) + "."
    for run in runs:
        if run.profile:
            top = "; ".join(f"{share:.0%} {frame}" for share, frame in run.profile[:8])
            text += f"\n\nBalancer self time (py-spy, separate run of the same load), {run.scenario}: {top}."
    return text


def start_upstream(kind: str, config: OverheadConfig, log_dir: Path) -> tuple[Process, str]:
    port = free_port()
    if kind == "stub":
        args = [sys.executable, "-m", "bench.stub_worker", "--port", str(port)]
    else:
        spec = WorkerSpec(batch_size=config.worker_batch_size, extra_args=("--max-wait-time", "0"))
        args = spec.args(port, "fake-model")
    proc = Process(args, log_dir / f"{kind}.log", kind)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url + "/health")
    except BaseException:
        proc.stop()
        raise
    return proc, url


def measure_upstream(kind: str, config: OverheadConfig, log_dir: Path) -> tuple[list[Run], int]:
    upstream, upstream_url = start_upstream(kind, config, log_dir)
    balancers: dict[str, tuple[str, Process]] = {}
    try:
        lb, lb_url = start_balancer([upstream_url], "round_robin", log_dir / f"lb-{kind}.log")
        balancers["balancer"] = (lb_url, lb)
        if config.before:
            old, old_url = start_balancer(
                [upstream_url], "round_robin", log_dir / f"lb-before-{kind}.log", code_dir=Path(config.before)
            )
            balancers["before"] = (old_url, old)
        events = sse_events(upstream_url + "/v1/completions", body(config.stream_tokens, True))
        for url, _ in balancers.values():
            via_lb = sse_events(url + "/v1/completions", body(config.stream_tokens, True))
            if via_lb != events:
                raise RuntimeError(f"the balancer changed the stream: {via_lb} events vs {events} direct")
        return measure(config, upstream, upstream_url, balancers), events
    finally:
        for _, proc in balancers.values():
            proc.stop()
        upstream.stop()


UPSTREAM_TEXT = {
    "fake": "a worker with the fake engine, no simulated latency, batch {batch}, no batching wait",
    "stub": "`bench.stub_worker`, a bare asyncio server with canned answers (isolates the balancer's cost)",
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            OverheadConfig, argv, prog="python -m bench.overhead", description=__doc__ or "",
            env_prefix="IB_OVERHEAD_",
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ensure_wrk()
    exit_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="ib-overhead-"))
    parts: list[str] = []
    all_runs: dict[str, list[dict[str, Any]]] = {}
    for kind in config.upstream:
        print(f"upstream {kind}:", file=sys.stderr, flush=True)
        runs, events = measure_upstream(kind, config, log_dir)
        all_runs[kind] = [asdict(r) for r in runs]
        described = UPSTREAM_TEXT[kind].format(batch=config.worker_batch_size)
        parts.append(f"**upstream `{kind}`**: {described}; {events} SSE events per streamed response.\n\n"
                     + table(config, runs, events))
    text = "\n\n".join(parts)
    print(text)
    if config.json:
        Path(config.json).write_text(json.dumps(all_runs, indent=2) + "\n")
    if config.results:
        setup = (
            f"wrk with {config.threads} thread(s), {config.duration:g} s per run after {config.warmup:g} s "
            f"of warm-up; direct and via the balancer (round_robin, one upstream) alternate {config.rounds} "
            "times per scenario and each cell is the round with the median req/s; non-streamed requests of "
            f"{config.max_tokens} tokens, streamed ones of {config.stream_tokens} tokens. wrk, balancer and "
            "upstream share the machine's 2 cores (and other jobs), so every figure includes that "
            "contention; compare within a table. SSE events/s is whole responses/s x events per response: "
            "through the balancer several events may share one TCP segment, so that ratio can exceed 1. In "
            "the profiles, `Runner.run` is time inside uvloop's C event loop (epoll, socket calls, waiting)."
        )
        write_section("overhead", "Balancer overhead (wrk)", f"{setup}\n\n{text}",
                      command_line(argv, "bench.overhead"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
