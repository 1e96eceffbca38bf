"""Stopping from every side: Ctrl-C after start-up, SIGTERM during start-up, stop.sh against a Python-API
cluster; and the SLURM node-task mode (--workers-only --register-with) against a balancer with no workers."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from scripts.cluster import LocalCluster
from tests.launch_support import Launched, script, wait_until
from tests.processes import free_port, get_json, python_module

pytestmark = pytest.mark.system


def recorded_processes(record: dict[str, Any]) -> list[psutil.Process]:
    entries = [record["lb"], *record["workers"]] if record.get("lb") else list(record["workers"])
    return [psutil.Process(entry["pid"]) for entry in entries]


def test_ctrl_c_stops_balancer_and_workers_and_says_so(launch: Callable[..., Launched]) -> None:
    cluster = launch("--engine", "fake", "--cpu-workers", "2", "--port", str(free_port()),
                     "--worker-base-port", str(free_port()))
    procs = recorded_processes(cluster.wait_ready(timeout=90))
    cluster.proc.popen.send_signal(signal.SIGINT)  # the launcher alone, as a terminal's Ctrl-C would reach it
    assert cluster.wait_exit(timeout=60) == 0
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive
    out = cluster.output()
    assert out.index("stopping the balancer") < out.index("stopping 2 workers") < out.index("verified by pid")
    assert "the launcher has no child process left" in out
    assert not cluster.record_path.exists()


def test_sigterm_during_startup_stops_what_was_started(launch: Callable[..., Launched]) -> None:
    cluster = launch("--worker-cmd", "sleep 600", "--cpu-workers", "2",
                     "--worker-base-port", str(free_port()), "--port", str(free_port()))
    wait_until(cluster.record_path.exists, 30, "cluster.json written while workers start")
    procs = recorded_processes(cluster.record())
    cluster.proc.popen.send_signal(signal.SIGTERM)
    assert cluster.wait_exit(timeout=60) == 130
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive
    assert "interrupted during start-up" in cluster.output()


def test_stop_script_stops_a_python_api_cluster_without_it_restarting_workers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cluster = LocalCluster(engine="fake", cpu_workers=2, port=free_port(), worker_base_port=free_port(),
                           health_check_interval=0.3, run_dir=str(run_dir), log_dir=str(tmp_path / "logs"))
    with cluster:
        procs = recorded_processes(json.loads((run_dir / "cluster.json").read_text()))
        stopped = script("stop", "--run-dir", str(run_dir))
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        _, alive = psutil.wait_procs(procs, timeout=5)
        assert not alive
        wait_until(lambda: cluster.stopped_from_outside, 10, "the supervisor noticing the stop")
        assert all(w.restarts == 0 for w in cluster.workers)
        assert not any(run_dir.iterdir())


def test_workers_only_mode_registers_each_worker_with_the_balancer(
        launch: Callable[..., Launched], spawn: Callable[..., Any]) -> None:
    lb_port = free_port()
    balancer = spawn(python_module("lb", "--port", str(lb_port), "--admin-token", "secret"), name="lb")
    balancer.wait_http_ok(f"http://127.0.0.1:{lb_port}/stats", timeout=60)
    node = launch("--workers-only", "--register-with", f"http://127.0.0.1:{lb_port}",
                  "--admin-token", "secret", "--engine", "fake", "--gpu-ids", "2,3",
                  "--worker-host", "127.0.0.1",
                  "--worker-base-port", str(free_port()))
    record = node.wait_ready(timeout=90)
    assert record["lb"] is None
    urls = sorted(w["url"] for w in record["workers"])
    stats = get_json(f"http://127.0.0.1:{lb_port}/stats")
    assert sorted(w["url"].rstrip("/") for w in stats["workers"]) == urls
    gpus = [get_json(url + "/health")["cuda_visible_devices"] for url in urls]
    assert sorted(gpus) == ["2", "3"]
