"""`python -m bench.stress` against a real balancer and fake workers: its figures agree with /stats."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.cluster import ClusterSpec, LocalCluster, WorkerSpec, start_balancer
from lb.stats import fetch_stats
from tests.processes import REPO_ROOT
from tests.processes import test_env as child_env

NUM_WORKERS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three fake workers (1 ms per decode step) behind a round-robin balancer, shared by this module."""
    spec = ClusterSpec(
        workers=tuple(WorkerSpec(step_latency=0.001) for _ in range(NUM_WORKERS)),
        policy="round_robin", log_dir=tmp_path_factory.mktemp("stress-cluster"),
    )
    with LocalCluster(spec) as running:
        yield running


def stress(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.stress", "--no-progress", *args],
        capture_output=True, text=True, env=child_env(), cwd=REPO_ROOT, timeout=timeout, check=False,
    )


def run_json(cluster: LocalCluster, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "stress.json"
    proc = stress("--url", cluster.lb_url, "--json", str(out), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_request_counts_agree_with_balancer_stats(cluster: LocalCluster, tmp_path: Path) -> None:
    before = fetch_stats(cluster.lb_url)
    report = run_json(cluster, tmp_path, "--num-requests", "30", "--concurrency", "5", "--max-tokens", "8")
    after = fetch_stats(cluster.lb_url)
    assert before is not None and after is not None
    summary, dist = report["summary"], report["distribution"]
    assert summary["requests"] == summary["ok"] == 30
    assert len(report["requests"]) == 30
    assert dist["total"] == 30 == dist["balancer_total_delta"]
    assert after["total_requests"] - before["total_requests"] == 30
    assert sum(w["requests"] for w in dist["workers"]) == dist["total"]
    # round robin over three workers: exactly 10 each, and the X-LB-Worker headers the client saw agree
    assert [w["requests"] for w in dist["workers"]] == [10, 10, 10]
    assert dist["max_min_ratio"] == 1.0
    assert summary["requests_by_worker"] == {str(w["index"]): w["requests"] for w in dist["workers"]}


def test_output_tokens_come_from_usage(cluster: LocalCluster, tmp_path: Path) -> None:
    report = run_json(
        cluster, tmp_path, "--num-requests", "6", "--max-tokens", "5", "--ignore-eos", "--endpoint", "chat",
    )
    assert [r["output_tokens"] for r in report["requests"]] == [5] * 6
    assert report["summary"]["output_tokens"] == 30


def test_stream_measures_ttft_and_draws_plot(cluster: LocalCluster, tmp_path: Path) -> None:
    plot = tmp_path / "stress.png"
    report = run_json(
        cluster, tmp_path, "--num-requests", "12", "--concurrency", "3", "--stream", "--max-tokens", "16",
        "--ignore-eos", "--plot", str(plot),
    )
    summary = report["summary"]
    assert summary["ok"] == 12 and summary["output_tokens"] == 12 * 16
    assert summary["ttft_ms_p50"] is not None and summary["ttft_ms_p50"] <= summary["latency_ms_p50"]
    assert all(r["ttft"] <= r["latency"] for r in report["requests"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["distribution"]["total"] == 12


def test_open_loop_and_duration_modes_send_what_they_report(cluster: LocalCluster, tmp_path: Path) -> None:
    report = run_json(cluster, tmp_path, "--rate", "40", "--num-requests", "20", "--max-tokens", "4")
    assert report["summary"]["ok"] == 20 == report["distribution"]["total"]
    report = run_json(cluster, tmp_path, "--duration", "1", "--concurrency", "2", "--max-tokens", "4")
    sent = report["summary"]["requests"]
    assert sent > 2 and report["summary"]["ok"] == sent == report["distribution"]["total"]


def test_error_rate_above_limit_exits_nonzero(cluster: LocalCluster, tmp_path: Path) -> None:
    proc = stress("--url", cluster.lb_url, "--num-requests", "4", "--model", "no-such-model")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "http_404: 4" in proc.stdout
    assert "exceeds --max-error-rate" in proc.stderr
    proc = stress(
        "--url", cluster.lb_url, "--num-requests", "4", "--model", "no-such-model", "--max-error-rate", "1"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_api_key_is_sent_and_its_absence_counted_as_401(cluster: LocalCluster, tmp_path: Path) -> None:
    key_args = ("--api-key", "sekret")
    lb, url = start_balancer(cluster.worker_urls, "round_robin", tmp_path / "lb-key.log", key_args)
    try:
        proc = stress("--url", url, "--num-requests", "6", "--max-tokens", "2", "--api-key", "sekret")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "6 / 6" in proc.stdout
        proc = stress("--url", url, "--num-requests", "3", "--max-tokens", "2")
        assert proc.returncode == 1
        assert "http_401: 3" in proc.stdout
    finally:
        lb.stop()


def test_bad_flag_value_exits_with_usage_error() -> None:
    proc = stress("--max-error-rate", "2")
    assert proc.returncode == 2
    assert "max_error_rate" in proc.stderr
