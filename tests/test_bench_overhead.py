"""`python -m bench.overhead` runs wrk against a worker directly and through the balancer, briefly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.wrk import lua_script
from tests.processes import REPO_ROOT
from tests.processes import test_env as child_env


def test_lua_script_carries_the_body_verbatim() -> None:
    body = b'{"prompt": "say \\"hi\\" ]] and \\n", "max_tokens": 4}'
    script = lua_script(body)
    assert "wrk.body = [==[" + body.decode() + "]==]" in script
    assert 'wrk.method = "POST"' in script


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install -y wrk)")
def test_overhead_reports_every_scenario_for_both_targets(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "--duration", "1", "--warmup", "0", "--rounds", "1",
         "--high-concurrency", "8", "--stream-tokens", "16", "--no-results", "--json", str(out)],
        capture_output=True, text=True, env=child_env(), cwd=REPO_ROOT, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [run for kind in ("fake", "stub") for run in json.loads(out.read_text())[kind]]
    assert len(runs) == 12
    assert {(r["target"], r["scenario"]) for r in runs} == {
        (t, s) for t in ("direct", "balancer") for s in ("c1", "c8", "c8-stream")
    }
    for run in runs:
        assert run["result"]["errors"] == 0, run
        assert run["result"]["requests"] > 0
        assert (run["lb_cpu_s"] is None) == (run["target"] == "direct")
    assert "**upstream `fake`**" in proc.stdout and "**upstream `stub`**" in proc.stdout
    assert "| req/s, concurrency 8 |" in proc.stdout
    assert "| SSE events/s, concurrency 8 |" in proc.stdout
