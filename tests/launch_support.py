"""Run the launcher CLI (`python -m scripts.launch`) as a real process in tests and wait until it is ready."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.processes import REPO_ROOT, ManagedProcess, test_env

READY_MARKERS = ("READY: balancer at", "workers ready (no balancer)")


@dataclass
class Launched:
    """One launcher process with its own run and log directories."""

    proc: ManagedProcess
    run_dir: Path
    log_dir: Path

    @property
    def record_path(self) -> Path:
        return self.run_dir / "cluster.json"

    def record(self) -> dict[str, Any]:
        return dict(json.loads(self.record_path.read_text()))

    def output(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Wait for the launcher's ready banner; fail with its output if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(marker in self.output() for marker in READY_MARKERS):
                return self.record()
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.popen.returncode}:\n{self.output()}")
            time.sleep(0.25)
        raise TimeoutError(f"launcher not ready after {timeout}s:\n{self.output()}")

    def wait_exit(self, timeout: float) -> int:
        return self.proc.popen.wait(timeout)


def script(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run scripts/<name>.sh with this interpreter (IB_PYTHON skips the venv lookup)."""
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / f"{name}.sh"), *args], capture_output=True,
                          text=True, timeout=timeout, env=test_env(IB_PYTHON=sys.executable), cwd=REPO_ROOT)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout}s")
