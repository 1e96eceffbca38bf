"""`python -m bench.batch`: a large OpenAI batch over simulated GPUs, against the same requests sent by
bench.stress's client at its best concurrency; interactive latency while the batch runs; a kill and resume.

Four fake-engine workers imitate batching GPUs (a prefill per admitted group, a cost per decode step and per
running sequence), as in bench.scaling. In order:
1. idle interactive p50: one request at a time, nothing else running;
2. closed-loop load (bench.client, the engine of bench.stress) at each --stress-concurrency: the best
   requests/s is the baseline;
3. the --lines batch through the OpenAI SDK, timed from `batches.create` to `completed` (validation and
   finalisation included), with interactive requests sent one at a time while it runs;
4. a --resume-lines batch run twice: undisturbed, then with the balancer SIGKILLed half way and started
   again on the same --data-dir; the difference in wall time is the cost of a kill and resume.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import openai

from bench.client import LoadSpec, run_load
from bench.cluster import ClusterSpec, LocalCluster, Process, WorkerSpec, exit_on_sigterm, start_balancer
from bench.plots import plot_progress
from bench.results import RESULTS_PATH, command_line, markdown_table, write_section
from lb.settings import ConfigError, load_config, setting

MODEL = "fake-model"
CHAT: Literal["/v1/chat/completions"] = "/v1/chat/completions"


@dataclass(frozen=True)
class BatchBenchConfig:
    workers: int = setting(4, "simulated GPUs (fake-engine workers)")
    batch_size: int = setting(8, "each worker's batch size (the balancer learns it from /health)")
    prefill_latency: float = setting(0.02, "simulated prefill seconds per admitted group")
    step_latency: float = setting(0.01, "simulated seconds per decode step, whatever the batch size")
    per_seq_latency: float = setting(0.0005, "simulated extra seconds per decode step per running sequence")
    max_tokens: int = setting(8, "output tokens per request (ignore_eos: exactly this many)")
    prompt_len: int = setting(16, "prompt words per request")
    lines: int = setting(20_000, "lines in the main batch")
    stress_requests: int = setting(4000, "requests per closed-loop baseline run")
    stress_concurrency: tuple[str, ...] = setting(
        ("32", "64", "96", "128"), "closed-loop concurrencies to try"
    )
    interactive: int = setting(40, "interactive requests measured idle and again while the batch runs")
    resume_lines: int = setting(4000, "lines in the batch that is killed half way and resumed")
    results: bool = setting(True, "write the section to bench/RESULTS.md and the plot beside it")
    log_dir: str | None = setting(None, "directory for logs and the data dir (default: a temporary one)")

    def __post_init__(self) -> None:
        if min(self.workers, self.batch_size, self.max_tokens, self.lines, self.resume_lines) < 1:
            raise ConfigError("workers, batch_size, max_tokens, lines and resume_lines must be >= 1")

    def worker_spec(self) -> WorkerSpec:
        return WorkerSpec(
            prefill_latency=self.prefill_latency,
            step_latency=self.step_latency,
            per_seq_latency=self.per_seq_latency,
            batch_size=self.batch_size,
            extra_args=("--max-queue", "1024", "--log-level", "warning"),
        )

    def load(self, url: str, concurrency: int, num: int, seed: int = 0) -> LoadSpec:
        return LoadSpec(
            url=url,
            endpoint="chat",
            model=MODEL,
            max_tokens=self.max_tokens,
            prompt_len=self.prompt_len,
            ignore_eos=True,
            concurrency=concurrency,
            num_requests=num,
            timeout=120.0,
            seed=seed,
        )


@dataclass
class Progress:
    seconds: float = 0.0  # from create to completed
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since create, lines done)
    resent: int = 0


@dataclass
class Report:
    idle_p50_ms: float = 0.0
    stress: dict[int, float] = field(default_factory=dict)  # concurrency -> requests/s
    batch_seconds: float = 0.0
    busy_p50_ms: float = 0.0
    resume_clean_s: float = 0.0
    resume_killed_s: float = 0.0
    restart_s: float = 0.0  # SIGKILL to the new balancer answering /health
    lines_done_at_kill: int = 0
    progress: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    kill_at_s: float = 0.0

    @property
    def best_stress(self) -> tuple[int, float]:
        return max(self.stress.items(), key=lambda kv: kv[1])


def batch_lines(config: BatchBenchConfig, n: int, seed: int) -> bytes:
    """`n` request lines whose bodies are exactly what bench.client sends for the same indexes."""
    spec = config.load("http://unused", 1, 1, seed)
    return b"".join(
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": json.loads(spec.body(i))}
        ).encode()
        + b"\n"
        for i in range(n)
    )


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=5, timeout=120)


async def interactive_p50(config: BatchBenchConfig, url: str, seed: int) -> float:
    run = await run_load(config.load(url, 1, config.interactive, seed))
    assert run.summary.latency_ms_p50 is not None and not run.summary.errors, run.summary
    return run.summary.latency_ms_p50


async def follow(client: openai.OpenAI, batch_id: str, started: float, progress: Progress) -> str:
    while True:
        batch = await asyncio.to_thread(client.batches.retrieve, batch_id)
        counts = batch.request_counts
        now = time.perf_counter() - started
        progress.samples.append((now, (counts.completed + counts.failed) if counts else 0))
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            progress.seconds = now
            return batch.status
        await asyncio.sleep(0.2)


async def run_batch(client: openai.OpenAI, data: bytes) -> tuple[str, float]:
    uploaded = await asyncio.to_thread(
        client.files.create, file=("bench.jsonl", io.BytesIO(data)), purpose="batch"
    )
    started = time.perf_counter()
    batch = await asyncio.to_thread(
        client.batches.create, input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
    )
    return batch.id, started


async def measure(config: BatchBenchConfig, log_dir: Path) -> Report:
    report = Report()
    data_dir = log_dir / "data"
    lb_args = (
        "--data-dir",
        str(data_dir),
        "--health-check-interval",
        "2",
        "--log-level",
        "warning",
    )
    spec = ClusterSpec(
        workers=tuple(config.worker_spec() for _ in range(config.workers)),
        log_dir=log_dir,
        lb_args=lb_args,
        startup_timeout=180.0,
        policy="least_connections",
    )
    with LocalCluster(spec) as cluster:
        url = cluster.lb_url
        report.idle_p50_ms = await interactive_p50(config, url, seed=7)
        log(f"idle interactive p50 {report.idle_p50_ms:.1f} ms")
        for c in (int(x) for x in config.stress_concurrency):
            run = await run_load(config.load(url, c, config.stress_requests))
            report.stress[c] = run.summary.requests_per_s
            log(f"stress c={c}: {run.summary.requests_per_s:.1f} req/s, {run.summary.errors} errors")
        client = sdk(url)
        batch_id, started = await run_batch(client, batch_lines(config, config.lines, seed=1))
        main = Progress()
        follower = asyncio.create_task(follow(client, batch_id, started, main))
        await asyncio.sleep(3.0)  # the batch is dispatching at full speed
        report.busy_p50_ms = await interactive_p50(config, url, seed=7)
        assert not follower.done(), "the batch finished before interactive latency was measured under it"
        status = await follower
        report.batch_seconds = main.seconds
        report.progress[f"{config.lines:,}-line batch"] = main.samples
        log(
            f"batch {status} in {main.seconds:.1f} s ({config.lines / main.seconds:.1f} lines/s); "
            f"interactive p50 under it {report.busy_p50_ms:.1f} ms"
        )
        await resume_cost(config, cluster, report, lb_args, log_dir)
    return report


async def resume_cost(
    config: BatchBenchConfig, cluster: LocalCluster, report: Report, lb_args: tuple[str, ...], log_dir: Path
) -> None:
    client = sdk(cluster.lb_url)
    clean = Progress()
    batch_id, started = await run_batch(client, batch_lines(config, config.resume_lines, seed=2))
    await follow(client, batch_id, started, clean)
    report.resume_clean_s = clean.seconds
    killed = Progress()
    batch_id, started = await run_batch(client, batch_lines(config, config.resume_lines, seed=3))
    while True:  # until half the lines are done
        counts = (await asyncio.to_thread(client.batches.retrieve, batch_id)).request_counts
        done = (counts.completed + counts.failed) if counts else 0
        killed.samples.append((time.perf_counter() - started, done))
        if done >= config.resume_lines // 2:
            break
        await asyncio.sleep(0.1)
    assert cluster.balancer is not None
    killed_at = time.perf_counter()
    cluster.balancer._signal_group(signal.SIGKILL)
    cluster.balancer.popen.wait(10)
    report.kill_at_s = killed_at - started
    report.lines_done_at_kill = done
    balancer: Process
    balancer, url = start_balancer(
        cluster.worker_urls, "least_connections", log_dir / "lb-restarted.log", lb_args, 120.0
    )
    cluster.balancer = balancer
    report.restart_s = time.perf_counter() - killed_at
    status = await follow(sdk(url), batch_id, started, killed)
    report.resume_killed_s = killed.seconds
    report.progress[f"{config.resume_lines:,} lines, undisturbed"] = clean.samples
    report.progress[f"{config.resume_lines:,} lines, SIGKILL + restart"] = killed.samples
    log(
        f"resume batch {status}: {clean.seconds:.1f} s undisturbed, {killed.seconds:.1f} s with a kill "
        f"(restart took {report.restart_s:.1f} s)"
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def body_text(config: BatchBenchConfig, report: Report) -> str:
    best_c, best_rps = report.best_stress
    batch_rps = config.lines / report.batch_seconds
    ratio = batch_rps / best_rps
    latency_ratio = report.busy_p50_ms / report.idle_p50_ms
    rows = [
        [
            "batch throughput vs bench.stress at its best concurrency",
            f"{batch_rps:.1f} vs {best_rps:.1f} req/s (c={best_c})",
            f"{ratio:.3f}x",
            ">= 0.95x",
            "met" if ratio >= 0.95 else "NOT met",
        ],
        [
            "interactive p50 while the batch runs vs idle",
            f"{report.busy_p50_ms:.1f} vs {report.idle_p50_ms:.1f} ms",
            f"{latency_ratio:.2f}x",
            "<= 1.25x",
            "met" if latency_ratio <= 1.25 else "NOT met",
        ],
        [
            "cost of SIGKILL + restart + resume",
            f"{report.resume_killed_s:.1f} vs {report.resume_clean_s:.1f} s",
            f"+{report.resume_killed_s - report.resume_clean_s:.1f} s",
            "(reported)",
            "-",
        ],
    ]
    stress_rows = [[c, f"{rps:.1f}"] for c, rps in sorted(report.stress.items())]
    setup = (
        f"{config.workers} fake-engine workers as simulated GPUs (batch {config.batch_size}, prefill "
        f"{config.prefill_latency}s, step {config.step_latency}s + {config.per_seq_latency}s per sequence), "
        f"{config.max_tokens} output tokens and {config.prompt_len} prompt words per request, "
        "the balancer's default bulk limit (twice the batch size, its batch size minus one while interactive "
        "requests arrive). Batch time runs from `batches.create` to "
        "`completed` as the SDK sees it (validation and finalisation included). Interactive p50: "
        f"{config.interactive} requests one at a time. The restart took {report.restart_s:.1f} s of the "
        f"kill's cost (a new `python -m lb` process until /health answers); {report.lines_done_at_kill} "
        f"lines were done when it was killed at {report.kill_at_s:.1f} s."
    )
    return (
        setup
        + "\n\n"
        + markdown_table(["claim", "measured", "ratio", "target", ""], rows)
        + "\n\nbench.stress's closed loop (same request bodies), requests/s by concurrency:\n\n"
        + markdown_table(["concurrency", "req/s"], stress_rows)
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            BatchBenchConfig,
            argv,
            prog="python -m bench.batch",
            description=__doc__ or "",
            env_prefix="IB_BATCH_BENCH_",
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    exit_on_sigterm()
    log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="ib-batch-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(measure(config, log_dir))
    text = body_text(config, report)
    print(text)
    (log_dir / "report.json").write_text(json.dumps({"config": asdict(config), "report": asdict(report)}))
    if config.results:
        plot_path = RESULTS_PATH.parent / "batch-progress.png"
        series = {name: ([t for t, _ in s], [n for _, n in s]) for name, s in report.progress.items()}
        plot_progress(plot_path, "Batch progress over time", series, {"SIGKILL": report.kill_at_s})
        body = f"{text}\n\n![batch progress]({plot_path.name})\n"
        write_section(
            "batch",
            "Batches: throughput, interactive latency, kill and resume",
            body,
            command_line(argv, "bench.batch"),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
