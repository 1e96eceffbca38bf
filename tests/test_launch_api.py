"""The Python API: LocalCluster.from_yaml (seed format), create_cluster, the heartbeat's health view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest
from openai import AuthenticationError, OpenAI

from lb.settings import ConfigError
from scripts.cluster import LocalCluster, create_cluster
from scripts.run_dir import RunDirError
from tests.processes import free_port, get_json

pytestmark = pytest.mark.system


def test_from_yaml_in_the_seed_format_starts_a_working_cluster(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(f"""
backend: fake
port: {free_port()}
output_dir: {tmp_path / "logs"}
env_vars: {{IB_WORKER_FAKE_STEP_LATENCY: 0}}
batching: {{batch_size: 4}}
cpu_workers: 2
worker_base_port: {free_port()}
run_dir: {tmp_path / "run"}
served_model_name: from-yaml
api_key: sk-from-yaml
""")
    with LocalCluster.from_yaml(path) as cluster:
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=cluster.openai_base_url, api_key="wrong").models.list()
        assert cluster.balancer is not None  # and its key is not on its command line, which ps shows:
        assert "sk-from-yaml" not in " ".join(psutil.Process(cluster.balancer.pid or 0).cmdline())
        client = OpenAI(base_url=cluster.openai_base_url, api_key="sk-from-yaml")
        text = client.completions.create(model="from-yaml", prompt="hello", max_tokens=3).choices[0].text
        assert text
        rows = cluster.health()
        assert [r["name"] for r in rows] == ["worker 0", "worker 1", "balancer"]
        assert all(r["running"] and r["healthy"] and r["restarts"] == 0 for r in rows)
        assert "--batch-size" in cluster.workers[0].argv and (tmp_path / "logs" / "worker-1.log").exists()
        assert cluster.is_healthy()
    assert not (tmp_path / "run" / "cluster.json").exists()


def test_create_cluster_from_settings_with_explicit_start_and_stop(tmp_path: Path) -> None:
    cluster = create_cluster({"engine": "fake", "cpu_workers": 1, "workers_only": True},
                             worker_base_port=free_port(), run_dir=str(tmp_path / "run"),
                             log_dir=str(tmp_path / "logs"))
    cluster.start()
    try:
        assert get_json(cluster.worker_urls[0] + "/health")["status"] == "ok"
        with pytest.raises(RuntimeError, match="balancer is not running"):
            _ = cluster.url
    finally:
        report = cluster.stop()
    assert report.left == [] and report.checked >= 1


def test_bad_settings_fail_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="unknown key 'gpu_count'"):
        LocalCluster(engine="fake", gpu_count=2)


def test_a_second_cluster_on_the_same_run_dir_is_refused_and_leaves_the_first_alone(tmp_path: Path) -> None:
    dirs: dict[str, Any] = {"run_dir": str(tmp_path / "run"), "log_dir": str(tmp_path / "logs"),
                            "workers_only": True}
    with LocalCluster(engine="fake", cpu_workers=1, worker_base_port=free_port(), **dirs) as first:
        second = LocalCluster(engine="fake", cpu_workers=1, worker_base_port=free_port(), **dirs)
        with pytest.raises(RunDirError, match="belongs to a running launcher"):
            second.start()
        assert first.run_file.exists() and first.is_healthy()
