"""Failures the launcher handles: a worker that cannot start fails the launch with its log tail; a worker
killed while serving is restarted and the balancer re-adds it."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from scripts.cluster import LaunchError, LocalCluster
from scripts.run_dir import process_alive
from tests.launch_support import Launched, wait_until
from tests.processes import free_port, get_json

pytestmark = pytest.mark.system


def test_wrong_model_path_fails_the_launch_with_the_worker_log_tail(
        launch: Callable[..., Launched], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    cluster = launch("--model-path", str(missing), "--cpu-workers", "2", "--port", str(free_port()),
                     "--worker-base-port", str(free_port()), "--startup-timeout", "120")
    assert cluster.wait_exit(timeout=150) == 1
    out = cluster.output()
    assert "launch failed: worker" in out and "during start-up; last lines of" in out
    assert str(missing) in out.split("last lines of", 1)[1]  # the worker's own error, from its log
    assert "verified by pid: none of the" in out
    assert not cluster.record_path.exists()


def test_startup_timeout_fails_the_launch_and_stops_the_workers(tmp_path: Path) -> None:
    cluster = LocalCluster(worker_cmd="sleep 600", cpu_workers=1, workers_only=True, startup_timeout=1.5,
                           worker_base_port=free_port(), run_dir=str(tmp_path / "run"), log_dir=str(tmp_path))
    with pytest.raises(LaunchError, match="not healthy after"):
        cluster.start()
    pid = cluster.workers[0].pid
    assert pid is not None and not process_alive(pid, None)
    assert not cluster.run_file.exists()


def backend(stats: dict[str, Any], url: str) -> dict[str, Any]:
    return next(w for w in stats["workers"] if w["url"].rstrip("/") == url)


def test_killed_worker_is_restarted_and_readded_by_the_balancer(tmp_path: Path) -> None:
    with LocalCluster(engine="fake", cpu_workers=2, port=free_port(), worker_base_port=free_port(),
                      policy="round_robin", health_check_interval=0.5, run_dir=str(tmp_path / "run"),
                      log_dir=str(tmp_path / "logs"), lb_args="--unhealthy-threshold 1 --healthy-threshold 1",
                      env_vars={"IB_WORKER_FAKE_STEP_LATENCY": "0"}) as cluster:
        client = OpenAI(base_url=cluster.openai_base_url, api_key="none", max_retries=0, timeout=30)
        victim = cluster.workers[1]
        old_pid, url = victim.pid, cluster.worker_urls[1]
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        seen_down = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            entry = backend(get_json(cluster.url + "/stats"), url)
            seen_down = seen_down or not entry["healthy"]
            if seen_down and entry["healthy"] and victim.pid != old_pid:
                break
            # Requests keep succeeding meanwhile: the balancer retries on (or routes to) the live worker.
            client.completions.create(model="fake-model", prompt="x", max_tokens=2)
            time.sleep(0.05)
        assert seen_down, "the balancer never marked the killed worker unhealthy"
        assert victim.pid != old_pid and victim.restarts == 1
        assert backend(get_json(cluster.url + "/stats"), url)["healthy"]
        wait_until(lambda: cluster.health()[1]["healthy"], 10, "the launcher's heartbeat seeing it healthy")
        served = backend(get_json(cluster.url + "/stats"), url)["requests_served"]
        for _ in range(4):
            client.completions.create(model="fake-model", prompt="x", max_tokens=2)
        assert backend(get_json(cluster.url + "/stats"), url)["requests_served"] > served
        record_pids = [w["pid"] for w in json.loads(cluster.run_file.read_text())["workers"]]
        assert victim.pid in record_pids  # cluster.json follows the restart, so stop.sh finds the new pid
