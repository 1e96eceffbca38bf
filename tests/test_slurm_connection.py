"""The SLURM job's readiness check runs on the host's bare Python: standard library only, no project venv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import SpawnFn
from tests.lb_cluster import start_lb, start_workers
from tests.processes import REPO_ROOT


def test_wait_ready_runs_on_a_bare_standard_library_python(spawn: SpawnFn, tmp_path: Path) -> None:
    workers = start_workers(spawn, 1)
    lb = start_lb(spawn, workers)
    (tmp_path / "admin_token").write_text("unused-token\n")
    # -I: no PYTHONPATH, no user site, no current directory; -S: not even this venv's site-packages (yarl,
    # aiohttp), so any import beyond the standard library and lb/stats_client.py fails
    argv = [
        sys.executable,
        "-I",
        "-S",
        str(REPO_ROOT / "slurm" / "connection.py"),
        "wait-ready",
        "--job-dir",
        str(tmp_path),
        "--job-id",
        "42",
        "--node",
        "node0",
        "--address",
        "127.0.0.1",
        "--port",
        str(lb.port),
        "--expect",
        "1",
        "--timeout",
        "20",
        "--login-host",
        "login",
    ]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "connection.json").read_text())
    assert record["ready"] is True and record["healthy_workers"] == 1 and record["model"] == "fake-model"
    assert "ssh -N -L" in done.stdout
