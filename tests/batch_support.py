"""Helpers for the batch tests: input lines, uploads through the OpenAI SDK, waiting for a batch, and what
each fake worker received (its own /metrics, so "nothing reached a worker" is the worker's word)."""

from __future__ import annotations

import io
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai

from tests.processes import ManagedProcess, free_port, python_module

MODEL = "fake-model"
CHAT = "/v1/chat/completions"
DONE = ("completed", "failed", "expired", "cancelled")


def line(i: int | str, **body: Any) -> dict[str, Any]:
    """One batch request line asking the fake engine to echo-generate for prompt `i`."""
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"prompt {i}"}],
        "max_tokens": 4,
        **body,
    }
    return {"custom_id": f"req-{i}", "method": "POST", "url": CHAT, "body": payload}


def jsonl(items: list[Any]) -> bytes:
    return b"".join(
        (item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in items
    )


def upload(client: openai.OpenAI, data: bytes, name: str = "input.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch").id


def submit(client: openai.OpenAI, data: bytes, window: str = "24h") -> str:
    file_id = upload(client, data)
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window=window)  # type: ignore[arg-type]
    return batch.id


def wait_batch(
    client: openai.OpenAI, batch_id: str, timeout: float = 60, until: tuple[str, ...] = DONE
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"batch {batch_id} still {batch.status} after {timeout}s: {batch.request_counts}"
            )
        time.sleep(0.05)


def records(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(raw) for raw in client.files.content(file_id).text.splitlines() if raw.strip()]


def all_records(client: openai.OpenAI, batch: Any) -> list[dict[str, Any]]:
    return records(client, batch.output_file_id) + records(client, batch.error_file_id)


def worker_requests(url: str) -> int:
    """Generation requests the worker at `url` has answered, by its own Prometheus counter."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return int(
        sum(
            float(row.rsplit(" ", 1)[1])
            for row in text.splitlines()
            if row.startswith("worker_requests_total{")
        )
    )


class Cluster:
    """Fake workers and one `python -m lb` on a data directory of its own; the balancer can be killed and
    started again on the same directory."""

    def __init__(
        self,
        tmp: Path,
        workers: int,
        worker_args: tuple[str, ...] = (),
        lb_args: tuple[str, ...] = (),
        engine: tuple[str, ...] = ("--engine", "fake"),
    ) -> None:
        self.tmp = tmp
        self.engine = engine
        self.data_dir = tmp / "data"
        self.lb_args = lb_args
        self.workers: list[tuple[ManagedProcess, str]] = []
        for i in range(workers):
            self.workers.append(self.start_worker(i, worker_args))
        for proc, url in self.workers:
            proc.wait_http_ok(url + "/health", timeout=120)
        self.lb_port = free_port()
        self.lb: ManagedProcess | None = None
        self._lb_runs = 0
        self.start_lb()

    def start_worker(
        self, i: int, args: tuple[str, ...], port: int | None = None
    ) -> tuple[ManagedProcess, str]:
        port = port or free_port()
        cmd = python_module(
            "workers",
            *self.engine,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--max-wait-time",
            "0",
            *args,
        )
        return ManagedProcess(cmd, self.tmp / f"worker-{i}-{port}.log"), f"http://127.0.0.1:{port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def start_lb(self) -> None:
        self._lb_runs += 1
        cmd = python_module(
            "lb",
            "--port",
            str(self.lb_port),
            "--health-check-interval",
            "0.2",
            "--health-check-timeout",
            "1",
            "--data-dir",
            str(self.data_dir),
            "--workers",
            ",".join(url for _, url in self.workers),
            *self.lb_args,
        )
        self.lb = ManagedProcess(cmd, self.tmp / f"lb-{self._lb_runs}.log")
        self.lb.wait_http_ok(self.url + "/health")

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def received(self) -> int:
        return sum(worker_requests(url) for _, url in self.workers)

    def stop(self) -> None:
        procs = ([self.lb] if self.lb else []) + [proc for proc, _ in self.workers]
        for proc in procs:
            proc.stop()
