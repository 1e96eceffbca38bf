"""End to end: the launcher CLI starts 2 CPU workers on the tiny model behind the balancer; the OpenAI SDK
gets answers through it; status.sh lists both; stop.sh stops everything, checked from outside by pid."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from openai import OpenAI

from tests.launch_support import Launched, script
from tests.processes import free_port

pytestmark = pytest.mark.system


def cluster_processes(record: dict[str, Any]) -> list[psutil.Process]:
    """The launcher, balancer and workers recorded in cluster.json, plus all their descendants."""
    procs = []
    for entry in [record["launcher"], record["lb"], *record["workers"]]:
        proc = psutil.Process(entry["pid"])
        procs += [proc, *proc.children(recursive=True)]
    return procs


def test_cpu_workers_serve_openai_requests_and_stop_leaves_nothing(
        launch: Callable[..., Launched], tiny_model_dir: Path) -> None:
    port, base = free_port(), free_port()
    cluster = launch("--model-path", str(tiny_model_dir), "--cpu-workers", "2", "--port", str(port),
                     "--worker-base-port", str(base), "--policy", "round_robin", "--batch-size", "4",
                     "--health-check-interval", "1")
    record = cluster.wait_ready(timeout=240)
    out = cluster.output()
    assert "OpenAI SDK example" in out and f"http://127.0.0.1:{port}/v1" in out
    assert f"http://127.0.0.1:{port}/dashboard" in out
    token = (cluster.run_dir / "admin-token").read_text().strip()
    worker_log = urllib.request.Request(f"http://127.0.0.1:{port}/logs/worker-1?lines=5",
                                        headers={"Authorization": f"Bearer {token}"})
    # the launcher gave the balancer its log paths
    with urllib.request.urlopen(worker_log, timeout=5) as resp:
        assert resp.read() in Path(record["workers"][1]["log"]).read_bytes()
    assert [w["gpus"] for w in record["workers"]] == ["", ""]

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60)
    model = client.models.list().data[0].id
    for i in range(4):
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"hi {i}"}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "stream"}],
                                            max_tokens=8, stream=True)
    chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert chunks

    status = script("status", "--run-dir", str(cluster.run_dir), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    rows = json.loads(status.stdout)["workers"]
    assert [(r["index"], r["healthy"], r["alive"]) for r in rows] == [(0, True, True), (1, True, True)]
    assert all((r["requests"] or 0) >= 2 for r in rows), rows  # round robin: 5 requests over 2 workers
    table = script("status", "--run-dir", str(cluster.run_dir)).stdout
    assert str(record["workers"][0]["port"]) in table and str(record["workers"][1]["port"]) in table

    procs = cluster_processes(record)
    assert len(procs) >= 4
    stopped = script("stop", "--run-dir", str(cluster.run_dir))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert cluster.wait_exit(timeout=60) == 0
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, f"still running: {alive}"
    assert not cluster.record_path.exists()
    assert "verified by pid: none of the" in cluster.output()
    assert (cluster.log_dir / "worker-0.log").exists() and (cluster.log_dir / "balancer.log").exists()
