"""Start a real worker process (`python -m workers`) on a free port for tests; stop it by process group."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.processes import ManagedProcess, free_port, python_module, test_env


@dataclass
class Worker:
    proc: ManagedProcess
    url: str  # http://127.0.0.1:PORT

    def get_json(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET path; (status, JSON body) for 2xx and error answers alike."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def metric(self, name: str) -> float:
        """Sum of a Prometheus sample's values over its labels (0 when absent)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextmanager
def running_worker(
    log_dir: Path, *flags: str, wait_ready: bool = True, env: dict[str, str] | None = None
) -> Iterator[Worker]:
    """A fake-engine worker unless `flags` choose another engine; stopped (SIGTERM, then SIGKILL) at exit."""
    port = free_port()
    args = python_module("workers", "--port", str(port), *(("--engine", "fake") if "--engine" not in flags
                                                          else ()), *flags)
    proc = ManagedProcess(args, log_dir / f"worker-{port}.log", env=test_env(**(env or {})))
    worker = Worker(proc, f"http://127.0.0.1:{port}")
    try:
        if wait_ready:
            proc.wait_http_ok(worker.url + "/health", timeout=120)
        yield worker
    finally:
        proc.stop()
