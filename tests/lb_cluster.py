"""Helpers for the balancer's integration tests: start fake workers and `python -m lb` as real processes."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import openai

from tests.conftest import SpawnFn
from tests.processes import ManagedProcess, free_port, get_json, python_module

FAST = ("--max-wait-time", "0")  # no batch-fill wait: the fake engine answers at once


@dataclass
class Proc:
    proc: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_worker(spawn: SpawnFn, *args: str, port: int | None = None, wait: bool = True) -> Proc:
    port = port or free_port()
    cmd = python_module(
        "workers", "--engine", "fake", "--port", str(port), "--log-level", "warning", *FAST, *args
    )
    worker = Proc(spawn(cmd, name=f"worker-{port}"), port)
    if wait:
        worker.proc.wait_http_ok(worker.url + "/health")
    return worker


def start_workers(spawn: SpawnFn, n: int, *args: str) -> list[Proc]:
    workers = [start_worker(spawn, *args, wait=False) for _ in range(n)]  # start in parallel, then wait
    for worker in workers:
        worker.proc.wait_http_ok(worker.url + "/health")
    return workers


def start_lb(spawn: SpawnFn, workers: list[Proc] | list[str], *args: str, wait_healthy: bool = True) -> Proc:
    port = free_port()
    urls = [w if isinstance(w, str) else w.url for w in workers]
    cmd = python_module(
        "lb",
        "--port",
        str(port),
        "--health-check-interval",
        "0.2",
        "--health-check-timeout",
        "1",
        *(["--workers", ",".join(urls)] if urls else []),
        *args,
    )
    lb = Proc(spawn(cmd, name="lb"), port)
    lb.proc.wait_http_ok(lb.url + ("/health" if urls and wait_healthy else "/stats"))
    return lb


def post_json(url: str, body: dict[str, Any], method: str = "POST", timeout: float = 30) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def client(lb: Proc, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=lb.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


def wait_until(predicate: Any, timeout: float = 10, interval: float = 0.02) -> float:
    """Poll until `predicate()` is true; returns the seconds it took, fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


def workers_stats(lb: Proc) -> list[dict[str, Any]]:
    return list(get_json(lb.url + "/stats")["workers"])


async def async_wait_until(predicate: Any, timeout: float = 10, interval: float = 0.02) -> float:  # noqa: ASYNC109
    """`wait_until` for tests that keep requests running on the event loop meanwhile."""
    import asyncio

    start = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start
