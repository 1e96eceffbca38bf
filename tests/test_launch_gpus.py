"""Each worker's GPUs and port, checked through its own /health (fake engine, so no GPU is needed)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scripts.cluster import LocalCluster
from tests.launch_support import Launched
from tests.processes import free_port, get_json

pytestmark = pytest.mark.system


def seen_gpus(worker_urls: list[str]) -> list[str | None]:
    return [get_json(url + "/health")["cuda_visible_devices"] for url in worker_urls]


def test_gpus_flag_pins_one_gpu_per_worker_and_skips_a_taken_port(launch: Callable[..., Launched]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        cluster = launch("--engine", "fake", "--gpus", "2", "--port", str(free_port()),
                         "--worker-base-port", str(taken))
        record = cluster.wait_ready(timeout=90)
        urls = [w["url"] for w in record["workers"]]
        assert seen_gpus(urls) == ["0", "1"]
        ports = [w["port"] for w in record["workers"]]
        assert taken not in ports and ports[0] > taken and ports[1] > ports[0]
        # "(N is taken)", or "(N is taken; N+1 is taken)" when another process holds the next port too
        assert f"worker 0: port {ports[0]} instead of {taken} ({taken} is taken" in cluster.output()


def test_gpu_ids_pin_the_listed_gpus_and_skip_ports_are_honoured(tmp_path: Path) -> None:
    base = free_port()
    with LocalCluster(engine="fake", gpus=[3, 5], port=free_port(), worker_base_port=base,
                      skip_ports=(str(base),), health_check_interval=0.5, run_dir=str(tmp_path / "run"),
                      log_dir=str(tmp_path / "logs")) as cluster:
        assert seen_gpus(cluster.worker_urls) == ["3", "5"]
        assert base not in [spec.port for spec in cluster.specs]
        assert any("in --skip-ports" in line for line in cluster.port_substitutions)


def test_gpus_per_worker_groups_ids_and_cpu_workers_see_no_gpu(tmp_path: Path) -> None:
    dirs: dict[str, Any] = {"run_dir": str(tmp_path / "run"), "log_dir": str(tmp_path / "logs")}
    with LocalCluster(engine="fake", gpu_ids="0,1,2,3", gpus_per_worker=2, workers_only=True,
                      worker_base_port=free_port(), **dirs) as grouped:
        assert seen_gpus(grouped.worker_urls) == ["0,1", "2,3"]
    with LocalCluster(engine="fake", cpu_workers=1, workers_only=True, worker_base_port=free_port(),
                      **dirs) as cpu:
        assert seen_gpus(cpu.worker_urls) in ([""], [None])
