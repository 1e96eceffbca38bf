"""bench.worker_throughput end to end on a tiny load: it starts a real hf worker, measures, stops it."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from bench import worker_throughput
from lb.settings import ConfigError, from_mapping


def test_smallest_run_measures_every_level_and_stops_its_worker(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    code = worker_throughput.main([
        "--model-path", str(tiny_model_dir), "--concurrency", "1,2", "--requests-per-user", "2",
        "--rounds", "1", "--max-tokens", "4", "--prompt-len", "8", "--no-engine-baseline", "--no-write",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "| 1 | 2 | 0 |" in out and "| 2 | 4 | 0 |" in out  # level, requests, errors
    leftovers = {p.pid for p in psutil.Process().children(recursive=True)} - children_before
    assert not leftovers


def test_bad_levels_are_refused() -> None:
    with pytest.raises(ConfigError, match="concurrency"):
        from_mapping(worker_throughput.ThroughputConfig, {"concurrency": ["0"]})
