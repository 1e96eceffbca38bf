"""`python -m bench.policy_overhead`: what each routing policy and routing feature costs per request, against
round robin, measured with wrk through balancers in front of two `bench.stub_worker` upstreams.

round_robin and least_connections never parse the body; least_tokens, prefix_affinity and session do (one
JSON parse per request, plus a hash for the affinity policies), as do rate limits. `--discover` over a
1,000-port range scanning every second shows whether background discovery slows the request path. All
balancers run side by side and the variants alternate within each round, so a slow spell of the shared machine
hits them alike; the median round is reported.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.cluster import Process, exit_on_sigterm, free_port, start_balancer
from bench.overhead import cpu_seconds
from bench.results import command_line, markdown_table, write_section
from bench.wrk import run_wrk
from lb.settings import ConfigError, load_config, setting

VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {  # name -> (policy, extra balancer flags)
    "round_robin": ("round_robin", ()),
    "least_connections": ("least_connections", ()),
    "power_of_two": ("power_of_two", ()),
    "least_tokens": ("least_tokens", ()),
    "prefix_affinity": ("prefix_affinity", ()),
    "session": ("session", ()),
    "round_robin + rate limits": ("round_robin", ("--rate-limit-rpm", "1000000000")),
    "round_robin + --discover 1,000 ports": (
        "round_robin",
        ("--discover-interval", "1"),
    ),  # range added below
}
PROMPT = "You are a careful grader. Grade the answer below. " * 4  # ~200 bytes, an affinity key's worth


@dataclass(frozen=True)
class PolicyOverheadConfig:
    duration: float = setting(3.0, "seconds per wrk run")
    rounds: int = setting(3, "rounds over all variants; the median round is shown")
    concurrency: int = setting(32, "connections for the throughput run")
    results: bool = setting(True, "write the table to bench/RESULTS.md")


def body() -> bytes:
    payload = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 8, "user": "bench-user"}
    return json.dumps(payload).encode()


def decision_cost(name: str, repeat: int = 20_000) -> float:
    """Microseconds of CPU for one routing decision in-process: the intake's reads (for a variant that has
    an intake), then the policy's choice over 4 backends, as `Proxy.forward` runs them. Unlike the wrk
    figures this hardly depends on how busy the shared machine is. NaN for a background feature."""
    from lb.backends import BackendPool
    from lb.config import BalancerConfig
    from lb.intake import Intake
    from lb.metrics import Metrics
    from lb.policies import POLICIES
    from lb.settings import from_mapping
    from lb.work import PLAIN

    policy_name, extra = VARIANTS[name]
    if "--discover-interval" in extra:
        return float("nan")
    settings: dict[str, object] = {"policy": policy_name}
    if "--rate-limit-rpm" in extra:
        settings["rate_limit_rpm"] = 1_000_000_000
    config = from_mapping(BalancerConfig, settings)
    pool = BackendPool()
    for i in range(4):
        pool.set_health(pool.add(f"http://127.0.0.1:{9400 + i}"), True)
    intake = Intake(config, Metrics(pool, lambda: 0)) if Intake.wanted(config) else None
    policy = POLICIES[policy_name]()
    data = body()
    headers = [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer k")]
    started = time.perf_counter()
    for _ in range(repeat):
        work = intake.admit("/v1/completions", headers, data).work if intake is not None else PLAIN
        policy.choose(pool.routable, work)
    return (time.perf_counter() - started) / repeat * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            PolicyOverheadConfig,
            argv,
            prog="python -m bench.policy_overhead",
            description=__doc__ or "",
            env_prefix="IB_BENCH_POLICY_",
        )
    except ConfigError as exc:
        print(f"python -m bench.policy_overhead: error: {exc}", file=sys.stderr)
        return 2
    exit_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="ib-policy-overhead-"))
    upstreams: list[Process] = []
    balancers: dict[str, tuple[Process, str]] = {}
    try:
        urls = []
        for i in range(2):
            port = free_port()
            proc = Process(
                [sys.executable, "-m", "bench.stub_worker", "--port", str(port)],
                log_dir / f"stub-{i}.log",
                f"stub-{i}",
            )
            upstreams.append(proc)
            urls.append(f"http://127.0.0.1:{port}")
            proc.wait_ready(urls[-1] + "/health")
        scan_base = free_port() // 2 + 10_000  # a 1,000-port range, mostly closed ports
        for name, (policy, extra) in VARIANTS.items():
            if "--discover-interval" in extra:
                extra = (*extra, "--discover", f"127.0.0.1:{scan_base}-{scan_base + 999}")
            balancers[name] = start_balancer(
                urls, policy, log_dir / f"lb-{policy}-{len(balancers)}.log", extra
            )
        data = body()
        rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in VARIANTS}
        for round_no in range(config.rounds):
            for name, (proc, url) in balancers.items():
                target = url + "/v1/completions"
                if round_no == 0:
                    run_wrk(target, data, config.concurrency, 1.0)  # warm-up
                c1 = run_wrk(target, data, 1, config.duration)
                cpu0 = cpu_seconds(proc)
                hi = run_wrk(target, data, config.concurrency, config.duration)
                cpu = (cpu_seconds(proc) - cpu0) / hi.requests * 1e6 if hi.requests else 0.0
                rows[name].append((c1.p50_ms, hi.p50_ms, hi.requests_per_s, cpu))
                print(
                    f"  {name:<38} c1 p50 {c1.p50_ms:.3f} ms  "
                    f"c{config.concurrency} {hi.requests_per_s:7.0f} req/s  CPU {cpu:.0f} us/req  "
                    f"errors {c1.errors + hi.errors}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for proc, _ in balancers.values():
            proc.stop()
        for proc in upstreams:
            proc.stop()

    def median_round(name: str) -> tuple[float, float, float, float]:
        ordered = sorted(rows[name], key=lambda r: r[2])
        return ordered[(len(ordered) - 1) // 2]

    base = median_round("round_robin")
    decisions = {name: decision_cost(name) for name in VARIANTS}
    table_rows: list[list[object]] = []
    for name in VARIANTS:
        p50_c1, p50_hi, rps, us = median_round(name)
        decision = decisions[name]
        timed = decision == decision  # NaN: a background feature, nothing per request to time
        table_rows.append([
            name, f"{decision:.1f}" if timed else "-",
            f"{decision - decisions['round_robin']:+.1f}" if timed else "-",
            p50_c1, f"{p50_c1 - base[0]:+.3f}", p50_hi, round(rps), f"{rps / base[2]:.2f}x", round(us),
            f"{us - base[3]:+.0f}",
        ])  # fmt: skip
    text = markdown_table(
        ["variant", "routing decision (us, in-process)", "vs round_robin", "p50 c1 (ms)", "vs round_robin",
         f"p50 c{config.concurrency} (ms)", f"req/s c{config.concurrency}", "vs round_robin",
         "balancer CPU/request (us)", "vs round_robin"],
        table_rows,
    )  # fmt: skip
    spread = statistics.pstdev(r[2] for r in rows["round_robin"]) if len(rows["round_robin"]) > 1 else 0.0
    text += (
        f"\n\nround_robin's req/s varied by {spread:.0f} (population std dev) across the "
        f"{config.rounds} rounds: differences smaller than that are noise."
    )
    print(text)
    if config.results:
        setup = (
            "Two `bench.stub_worker` upstreams (canned answers), one balancer per variant (all running, "
            f"alternating), wrk: {config.duration:g} s at concurrency 1 and {config.concurrency} per round, "
            f"{config.rounds} rounds, median round by req/s; completions body of ~250 bytes with a `user`. "
            "The 2-core machine is shared with other jobs and wrk: figures are indicative."
        )
        write_section(
            "policy-overhead",
            "Routing policies and features: cost per request vs round_robin",
            f"{setup}\n\n{text}",
            command_line(argv, "bench.policy_overhead"),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
