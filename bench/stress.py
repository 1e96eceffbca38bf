"""`python -m bench.stress`: load one OpenAI-compatible endpoint and report throughput, latency and spread.

Closed loop by default (`--concurrency` users, each sending the next request when the last one returns), open
loop with `--rate` (Poisson arrivals). When the URL is a balancer, its `/stats` is read before and after the
run and the per-worker difference is printed with the busiest/least-busy ratio. Exits 1 when the error rate
exceeds `--max-error-rate`, 2 on a bad flag.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.client import ENDPOINT_PATHS, LoadRun, LoadSpec, RequestResult, run_load
from bench.distribution import Distribution, distribution
from bench.results import RESULTS_PATH, command_line, write_section
from lb.settings import ConfigError, load_config, setting
from lb.stats import fetch_stats

DEFAULT_NUM_REQUESTS = 50


@dataclass(frozen=True)
class StressConfig:
    url: str = setting("http://127.0.0.1:8000", "base URL of the balancer (or of one worker)")
    num_requests: int | None = setting(
        None, f"requests to send (default {DEFAULT_NUM_REQUESTS}, or unlimited when --duration is given)"
    )
    concurrency: int = setting(10, "closed loop: requests in flight; with --rate: a cap on them (0 = none)")
    duration: float | None = setting(None, "seconds: stop starting requests after this long")
    rate: float | None = setting(None, "open loop: Poisson arrivals at this many requests/s")
    endpoint: str = setting("completions", "which OpenAI endpoint to call", choices=sorted(ENDPOINT_PATHS))
    stream: bool = setting(False, "stream responses (SSE) and measure time to first token")
    model: str | None = setting(None, "the `model` field to send (default: none; the server picks)")
    max_tokens: int = setting(64, "max_tokens per request")
    prompt_len: int = setting(32, "synthetic prompt length in words (about one token each)")
    ignore_eos: bool = setting(False, "ask the server to ignore EOS so every request makes max_tokens tokens")
    api_key: str | None = setting(None, "sent as `Authorization: Bearer KEY`")
    admin_token: str | None = setting(None, "bearer token for the balancer's /stats, when it requires one")
    timeout: float = setting(300.0, "seconds without data before a request counts as failed")
    seed: int = setting(0, "seed for prompts and open-loop arrival times")
    json: str | None = setting(None, "write config, summary, distribution and every request to this file")
    plot: str | None = setting(None, "draw latency distribution and per-worker share to this PNG")
    results_section: str | None = setting(
        None, "also write the report to this section of bench/RESULTS.md (the plot, if any, beside it)"
    )
    results_note: str | None = setting(None, "a sentence for that section, e.g. what was behind the URL")
    max_error_rate: float = setting(0.0, "exit 1 when the fraction of failed requests exceeds this")
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError("max_error_rate: must be within 0..1")
        if self.num_requests is not None and self.num_requests < 1:
            raise ConfigError("num_requests: must be >= 1")
        if self.concurrency < 0:
            raise ConfigError("concurrency: must be >= 0")

    def load_spec(self) -> LoadSpec:
        num = self.num_requests
        if num is None and self.duration is None:
            num = DEFAULT_NUM_REQUESTS
        try:
            return LoadSpec(
                url=self.url, endpoint=self.endpoint, model=self.model, stream=self.stream,  # type: ignore[arg-type]
                max_tokens=self.max_tokens, prompt_len=self.prompt_len, ignore_eos=self.ignore_eos,
                api_key=self.api_key, concurrency=self.concurrency, num_requests=num, duration=self.duration,
                rate=self.rate, timeout=self.timeout, seed=self.seed,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class StressReport:
    run: LoadRun
    distribution: Distribution | None

    def to_dict(self, config: StressConfig) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(config).items() if k not in ("api_key", "admin_token")}
        return {
            "config": settings,
            "summary": self.run.summary.to_dict(),
            "distribution": self.distribution.to_dict() if self.distribution else None,
            "requests": [asdict(r) for r in self.run.results],
        }


async def stress(config: StressConfig) -> StressReport:
    spec = config.load_spec()
    before = await asyncio.to_thread(fetch_stats, config.url, config.admin_token, 5.0)
    bar = tqdm(total=spec.num_requests, unit="req", disable=not config.progress, file=sys.stderr, leave=False)

    def on_result(result: RequestResult) -> None:
        bar.update(1)

    try:
        run = await run_load(spec, on_result)
    finally:
        bar.close()
    after = await asyncio.to_thread(fetch_stats, config.url, config.admin_token, 5.0) if before else None
    return StressReport(run, distribution(before, after) if before and after else None)


def format_report(report: StressReport) -> str:
    rows = report.run.summary.table_rows()
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    if report.run.summary.errors:
        first = next(r for r in report.run.results if not r.ok)
        lines.append(f"first error: {first.error_kind}: {first.error_message}")
    dist = report.distribution
    if dist is None:
        lines.append("per-worker distribution: (no balancer /stats at this URL)")
        return "\n".join(lines)
    lines += ["", "per-worker distribution (balancer /stats, this run):"]
    lines.append("  idx  requests  share   errors  url")
    for w in dist.workers:
        mark = "" if w.healthy else "  (unhealthy)"
        lines.append(f"  {w.index:>3}  {w.requests:>8}  {w.share:>5.1%}  {w.errors:>6}  {w.url}{mark}")
    ratio = "n/a (a worker served none)" if dist.max_min_ratio is None else f"{dist.max_min_ratio:.2f}"
    lines.append(f"  total {dist.total}; max/min ratio {ratio}")
    return "\n".join(lines)


def write_results(config: StressConfig, report: StressReport, argv: Sequence[str] | None) -> None:
    note = config.results_note + "\n\n" if config.results_note else ""
    body = note + "```\n" + format_report(report) + "\n```\n"
    if config.plot:
        plot = Path(config.plot).resolve()
        beside = RESULTS_PATH.parent / plot.name
        if plot != beside.resolve():
            shutil.copyfile(plot, beside)
        body += f"\n![{config.results_section}]({plot.name})\n"
    name = str(config.results_section)
    args = list(sys.argv[1:] if argv is None else argv)
    if "--results-note" in args:  # the note is printed above the table already, not repeated in the command
        i = args.index("--results-note")
        del args[i:i + 2]
    write_section(name, f"Stress: {name}", body, command_line(args, "bench.stress"))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            StressConfig, argv, prog="python -m bench.stress", description=__doc__ or "",
            env_prefix="IB_STRESS_",
        )
        report = asyncio.run(stress(config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if config.json:
        Path(config.json).write_text(json.dumps(report.to_dict(config), indent=2) + "\n")
        print(f"wrote {config.json}")
    if config.plot:
        from bench.plots import plot_stress  # matplotlib loads in ~1 s: only when a plot is asked for

        plot_stress(report.run, report.distribution, Path(config.plot))
        print(f"wrote {config.plot}")
    if config.results_section:
        write_results(config, report, argv)
    rate = report.run.summary.error_rate
    if rate > config.max_error_rate:
        print(f"error rate {rate:.1%} exceeds --max-error-rate {config.max_error_rate:.1%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
