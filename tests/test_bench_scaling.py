"""`python -m bench.scaling` on quick simulated GPUs: counts match the balancer's; the policies differ."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.processes import REPO_ROOT
from tests.processes import test_env as child_env

# Short steps and few tokens: each (N, policy) point takes about two seconds.
QUICK = ("--warmup", "0.5", "--measure", "1.5", "--step-latency", "0.01", "--prefill-latency", "0.01",
         "--per-seq-latency", "0", "--max-tokens", "8", "--batch-size", "4", "--no-results")


def scaling(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scaling", *QUICK, "--json", str(out), *args],
        capture_output=True, text=True, env=child_env(), cwd=REPO_ROOT, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| workers | throughput (tok/s) |" in proc.stdout
    points: list[dict[str, Any]] = json.loads(out.read_text())["points"]
    return points


def test_every_request_is_counted_by_the_balancer(tmp_path: Path) -> None:
    points = scaling(tmp_path, "--workers", "1,2", "--policy", "round_robin,least_connections")
    assert [(p["policy"], p["workers"]) for p in points] == [
        ("round_robin", 1), ("round_robin", 2), ("least_connections", 1), ("least_connections", 2)
    ]
    for point in points:
        assert point["errors"] == 0
        assert len(point["per_worker"]) == point["workers"]
        assert sum(point["per_worker"]) == point["requests"] > 0  # the balancer's /stats saw every request
        assert point["tokens_per_s"] > 0
        assert point["concurrency"] == math.ceil(point["workers"] * 4 * 1.25)  # batches kept full
    round_robin_2 = points[1]["per_worker"]
    assert abs(round_robin_2[0] - round_robin_2[1]) <= 1  # strict rotation
    assert points[0]["speedup"] == 1.0 and points[1]["speedup"] > 1.5


def test_heterogeneous_least_connections_favours_the_fast_worker(tmp_path: Path) -> None:
    points = scaling(tmp_path, "--workers", "2", "--policy", "least_connections", "--heterogeneous")
    fast, slow = points[0]["per_worker"]  # worker 1 (odd) is the 2x slower one
    assert fast > slow
