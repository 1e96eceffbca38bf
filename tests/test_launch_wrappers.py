"""The shell front doors: --help covers every flag, start_batch_server.sh --local reaches the launcher, and
status/stop say so when there is no cluster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lb.settings import flag_name
from scripts.cluster_config import ClusterConfig
from tests.launch_support import script


def test_help_explains_every_flag() -> None:
    result = script("start_multi_gpu_server", "--help")
    assert result.returncode == 0
    for field in dataclasses.fields(ClusterConfig):
        assert flag_name(field.name) in result.stdout, field.name


def test_batch_server_local_goes_to_the_launcher() -> None:
    result = script("start_batch_server", "--local", "--engine", "fake", "--cpu-workers", "0")
    assert result.returncode == 2
    assert "cpu_workers: must be at least 1" in result.stderr


def test_status_and_stop_without_a_cluster_say_so(tmp_path: Path) -> None:
    for name in ("status", "stop"):
        result = script(name, "--run-dir", str(tmp_path))
        assert result.returncode == 2 and "no cluster is recorded" in result.stderr
