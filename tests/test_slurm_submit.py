"""The submit side, no daemons: how flags become an allocation, sbatch options and the job's environment."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lb.settings import ConfigError, from_mapping
from slurm.config import SlurmJobConfig
from slurm.connection import instructions, tunnel_command
from slurm.submit import JOB_TEMPLATE, job_environment, sbatch_command
from tests.processes import REPO_ROOT
from tests.processes import test_env as child_env

SUBMIT = REPO_ROOT / "slurm" / "start_multi_gpu_slurm.sh"


def job(**values: object) -> SlurmJobConfig:
    return from_mapping(SlurmJobConfig, {"model_path": "/models/m", **values})


@pytest.mark.parametrize(
    ("values", "nodes", "per_node", "expected"),
    [
        ({"gpus": 8}, 1, 8, 8),
        ({"gpus": 8, "nodes": 2}, 2, 4, 8),
        ({"gpus": 8, "gpus_per_node": 4}, 2, 4, 8),
        ({"gpus": 8, "nodes": 2, "gpus_per_node": 4}, 2, 4, 8),
        ({"cpu_workers": 3, "nodes": 2}, 2, 0, 6),
    ],
)
def test_allocation_follows_gpus_nodes_and_gpus_per_node(
    values: dict[str, int], nodes: int, per_node: int, expected: int
) -> None:
    cfg = job(**values)
    assert (cfg.node_count, cfg.gpus_on_each_node, cfg.expected_workers) == (nodes, per_node, expected)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({}, "gpus"),
        ({"gpus": 6, "nodes": 4}, "nodes"),
        ({"gpus": 6, "gpus_per_node": 4}, "gpus_per_node"),
        ({"gpus": 8, "nodes": 4, "gpus_per_node": 4}, "nodes"),
        ({"gpus": 2, "cpu_workers": 2}, "cpu_workers"),
        ({"gpus": 2, "port": 9001}, "port"),
        ({"gpus": 2, "model_path": None}, "model_path"),
        ({"gpus": 2, "engine": "tgi"}, "engine"),
        ({"gpus": 2, "nodes": 0}, "nodes"),
    ],
)
def test_inconsistent_settings_are_errors_naming_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        job(**values)


def test_fake_engine_needs_no_model_path() -> None:
    assert from_mapping(SlurmJobConfig, {"gpus": 2, "engine": "fake"}).model_path is None


def test_sbatch_command_requests_one_task_and_the_gpus_of_each_node() -> None:
    cmd = sbatch_command(job(gpus=8, nodes=2, account="acct", partition="gpu", time="01:00:00",
                             sbatch_arg=("--exclusive",)))
    assert cmd[0] == "sbatch" and cmd[-1] == str(JOB_TEMPLATE)
    for option in ("--nodes=2", "--ntasks-per-node=1", "--gres=gpu:4", "--account=acct", "--partition=gpu",
                   "--time=01:00:00", "--exclusive"):
        assert option in cmd


def test_cpu_workers_request_no_gpus() -> None:
    cmd = sbatch_command(job(cpu_workers=2))
    assert not [option for option in cmd if option.startswith("--gres")]
    assert job_environment(job(cpu_workers=2))["IB_JOB_CPU_WORKERS"] == "2"


def test_job_environment_carries_python_ports_and_container() -> None:
    env = job_environment(job(gpus=2, python="/opt/venv/bin/python", port=9100, worker_base_port=9200,
                              container_image="nvcr.io/x:1"))
    assert env["IB_JOB_PYTHON"] == "/opt/venv/bin/python"
    ports = (env["IB_JOB_PORT"], env["IB_JOB_WORKER_BASE_PORT"], env["IB_JOB_EXPECTED_WORKERS"])
    assert ports == ("9100", "9200", "2")
    assert env["IB_JOB_CONTAINER_IMAGE"] == "nvcr.io/x:1"
    assert env["IB_JOB_REPO"] == str(REPO_ROOT)


def test_model_loading_options_travel_to_the_workers_with_absolute_paths(tmp_path: Path) -> None:
    env = job_environment(job(gpus=2, model_path=None, dcp_path="ckpt", base_model=str(tmp_path),
                              trust_remote_code=True, engine_args="--dtype bfloat16"))
    assert shlex.split(env["IB_JOB_ENGINE_ARGS"]) == [
        "--trust-remote-code", "--dcp-path", str(Path("ckpt").resolve()), "--base-model", str(tmp_path),
        "--dtype", "bfloat16"]


def test_instructions_give_the_tunnel_and_an_sdk_example() -> None:
    record = {"job_id": "7", "node": "gpu01", "address": "10.0.0.5", "port": 9000, "url": "http://10.0.0.5:9000",
              "login_host": "login.hpc", "local_port": 8000, "healthy_workers": 8, "expected_workers": 8,
              "model": "llama"}
    assert tunnel_command(record) == "ssh -N -L 8000:10.0.0.5:9000 login.hpc"
    text = instructions(record)
    assert 'base_url="http://localhost:8000/v1"' in text and "scancel 7" in text
    assert "http://localhost:8000/dashboard" in text


def _run_submit(*args: str) -> subprocess.CompletedProcess[str]:
    env = child_env(IB_PYTHON=sys.executable)
    return subprocess.run(["bash", str(SUBMIT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_help_explains_every_flag() -> None:
    result = _run_submit("--help")
    assert result.returncode == 0
    for flag in ("--gpus", "--nodes", "--gpus-per-node", "--model-path", "--engine", "--batch-size",
                 "--max-wait-time", "--port", "--account", "--partition", "--time", "--container-image",
                 "--cpu-workers", "--wait"):
        assert flag in result.stdout


def test_bad_flags_exit_2_with_the_key_named() -> None:
    result = _run_submit("--gpus", "3", "--nodes", "2", "--model-path", "/m")
    assert result.returncode == 2 and "nodes" in result.stderr
    assert _run_submit("--gpus", "two").returncode == 2


def test_dry_run_prints_the_sbatch_command_without_submitting() -> None:
    result = _run_submit("--gpus", "4", "--nodes", "2", "--engine", "fake", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "sbatch --parsable" in result.stdout and "--gres=gpu:2" in result.stdout
    assert "export IB_JOB_EXPECTED_WORKERS=4" in result.stdout


@pytest.mark.parametrize(("env", "flags", "expected"), [
    ({"ACCOUNT": "acct"}, [], ("--account=acct", "environment ACCOUNT")),
    ({"SBATCH_ACCOUNT": "sb", "ACCOUNT": "acct"}, [], ("--account=sb", "environment SBATCH_ACCOUNT")),
    ({"ACCOUNT": "acct", "IB_SLURM_ACCOUNT": "ours"}, [], ("--account=ours", "environment IB_SLURM_ACCOUNT")),
    ({"ACCOUNT": "acct"}, ["--account", "flag"], ("--account=flag", "flag --account")),
    ({"SBATCH_PARTITION": "gpu"}, [], ("--partition=gpu", "environment SBATCH_PARTITION")),
])
def test_slurm_convention_variables_fill_unset_values_and_the_dry_run_says_from_where(
        env: dict[str, str], flags: list[str], expected: tuple[str, str]) -> None:
    clean = {k: v for k, v in child_env().items()
             if k not in ("ACCOUNT", "SBATCH_ACCOUNT", "SBATCH_PARTITION", "IB_SLURM_ACCOUNT")}
    result = subprocess.run([sys.executable, "-m", "slurm.submit", "--gpus", "2", "--engine", "fake",
                             "--dry-run", *flags], env={**clean, **env}, capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    option, source = expected
    sbatch = next(line for line in result.stdout.splitlines() if line.startswith("sbatch "))
    assert option in sbatch.split()
    name, value = option[2:].split("=")
    assert f"# {name} = {value!r}  ({source})" in result.stdout


def test_container_image_runs_both_steps_through_pyxis(tmp_path: Path) -> None:
    """The batch template outside SLURM, with an `srun` that records its arguments: both steps get the image
    and the default mounts. (No pyxis here: this checks the options, not a container run.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "srun-calls.txt"
    fake_srun = bin_dir / "srun"
    fake_srun.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake_srun.chmod(0o755)
    cfg = job(gpus=2, container_image="registry/ib:1", output_dir=str(tmp_path / "out"), ready_timeout=5)
    env = child_env(**job_environment(cfg), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42",
                    SLURMD_NODENAME="gpu01", SLURM_JOB_NODELIST="gpu01")
    result = subprocess.run(["bash", str(JOB_TEMPLATE)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr  # both fake steps "ended": the job gives up
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and all("--container-image=registry/ib:1" in line for line in lines)
    mounts = f"--container-mounts={REPO_ROOT}:{REPO_ROOT},{tmp_path / 'out'}:{tmp_path / 'out'}"
    assert all(mounts in line for line in lines)
    # both steps start in the background, so their srun calls may be recorded in either order
    balancer, node_tasks = sorted(lines, key=lambda line: "slurm/node_task.sh" in line)
    assert "--nodelist=gpu01" in balancer and "-m lb --host 0.0.0.0" in balancer
    assert "slurm/node_task.sh" in node_tasks
    token_mode = (tmp_path / "out" / "42" / "admin_token").stat().st_mode
    assert token_mode & 0o077 == 0  # the admin token is readable by its owner only
