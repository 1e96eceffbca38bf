"""Submit the batch job (slurm/multi_gpu_job.sbatch) from a SlurmJobConfig; with --wait, wait until it serves.

`python -m slurm.submit` is what `slurm/start_multi_gpu_slurm.sh` runs. Waiting polls `squeue` and the job's
connection file rather than using `sbatch --wait`, which only returns when the job ends.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lb.settings import ConfigError
from scripts.commands import loading_flags
from slurm.config import CONVENTION_ENV, NODE_PORT_STRIDE, SlurmJobConfig, load
from slurm.connection import instructions, read_connection

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_TEMPLATE = REPO_ROOT / "slurm" / "multi_gpu_job.sbatch"
POLL_INTERVAL_S = 1.0


def absolute_paths(cfg: SlurmJobConfig) -> SlurmJobConfig:
    """The config with its checkpoint directories absolute, as node tasks in other directories need them."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path is not None else None

    return dataclasses.replace(cfg, dcp_path=absolute(cfg.dcp_path), base_model=absolute(cfg.base_model))


def sbatch_command(cfg: SlurmJobConfig) -> list[str]:
    """The sbatch command; the allocation goes in options, so the template's #SBATCH lines stay defaults."""
    out = cfg.output_path
    cmd = [
        "sbatch", "--parsable", f"--job-name={cfg.job_name}", f"--nodes={cfg.node_count}",
        "--ntasks-per-node=1", f"--output={out}/slurm-%j.out", "--export=ALL",
    ]
    if cfg.gpus_on_each_node:
        cmd.append(f"--gres=gpu:{cfg.gpus_on_each_node}")
    for flag, value in (("--account", cfg.account), ("--partition", cfg.partition), ("--time", cfg.time),
                        ("--cpus-per-task", cfg.cpus_per_task)):
        if value is not None:
            cmd.append(f"{flag}={value}")
    cmd += list(cfg.sbatch_arg)
    cmd.append(str(JOB_TEMPLATE))
    return cmd


def job_environment(cfg: SlurmJobConfig) -> dict[str, str]:
    """The IB_JOB_* variables the template and slurm/node_task.sh read (documented at the template's top)."""
    env = {
        "IB_JOB_REPO": str(REPO_ROOT),
        "IB_JOB_PYTHON": cfg.python or sys.executable,
        "IB_JOB_OUTPUT_DIR": str(cfg.output_path),
        "IB_JOB_PORT": str(cfg.port),
        "IB_JOB_POLICY": cfg.policy,
        "IB_JOB_EXPECTED_WORKERS": str(cfg.expected_workers),
        "IB_JOB_NODE_ADDR": cfg.node_addr or "",
        "IB_JOB_LOGIN_HOST": cfg.login_host or "",
        "IB_JOB_LOCAL_PORT": str(cfg.local_port),
        "IB_JOB_READY_TIMEOUT": str(cfg.ready_timeout),
        "IB_JOB_CONTAINER_IMAGE": cfg.container_image or "",
        "IB_JOB_CONTAINER_MOUNTS": cfg.container_mounts or "",
        "IB_JOB_MODEL_PATH": str(Path(cfg.model_path).expanduser().resolve()) if cfg.model_path else "",
        "IB_JOB_ENGINE": cfg.engine,
        "IB_JOB_ENGINE_ARGS": " ".join(filter(None, [shlex.join(loading_flags(absolute_paths(cfg))),
                                                     cfg.engine_args])),
        "IB_JOB_BATCH_SIZE": str(cfg.batch_size),
        "IB_JOB_MAX_WAIT_TIME": str(cfg.max_wait_time),
        "IB_JOB_CPU_WORKERS": str(cfg.cpu_workers),
        "IB_JOB_WORKER_BASE_PORT": str(cfg.worker_base_port),
        "IB_JOB_NODE_PORT_STRIDE": str(NODE_PORT_STRIDE),
    }
    return env


def submit(cfg: SlurmJobConfig) -> str:
    """Run sbatch; returns the job id (raises RuntimeError with sbatch's message on failure)."""
    cfg.output_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **job_environment(cfg)}
    result = subprocess.run(sbatch_command(cfg), env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip()
        raise RuntimeError(f"sbatch failed ({result.returncode}): {message}")
    return result.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"


def squeue_state(job_id: str) -> tuple[str, str] | None:
    """(state, reason) while SLURM lists the job, None once it left the queue."""
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%R"], capture_output=True, text=True,
                            timeout=30)
    line = result.stdout.strip()
    if result.returncode != 0 or not line:
        return None
    state, _, reason = line.partition("|")
    return state, reason


def wait_until_ready(cfg: SlurmJobConfig, job_id: str) -> int:
    """Poll until connection.json says ready (0), the job leaves the queue (1) or --wait-timeout passes."""
    job_dir = cfg.output_path / job_id
    log_file = cfg.output_path / f"slurm-{job_id}.out"
    deadline = time.monotonic() + cfg.wait_timeout
    last_state: tuple[str, str] | None = None
    while time.monotonic() < deadline:
        record = read_connection(job_dir)
        if record is not None:
            print(instructions(record))
            if not record.get("ready"):
                print(f"warning: only {record['healthy_workers']} of {record['expected_workers']} workers "
                      f"joined; see {job_dir}/node-*/", file=sys.stderr)
            return 0 if record.get("ready") else 1
        state = squeue_state(job_id)
        if state is None:
            tail = _tail(log_file)
            print(f"job {job_id} ended before it was ready; {log_file}:\n{tail}", file=sys.stderr)
            return 1
        if state != last_state:
            print(f"job {job_id}: {state[0].lower()} ({state[1]})", file=sys.stderr)
            last_state = state
        time.sleep(POLL_INTERVAL_S)
    print(f"job {job_id} not ready after {cfg.wait_timeout:.0f}s (still queued or starting); "
          "it keeps running", file=sys.stderr)
    return 1


def _tail(path: Path, lines: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output file)"


def describe_sources(cfg: SlurmJobConfig, sources: dict[str, str]) -> list[str]:
    """Comment lines for the dry run: each value that was set, and where it came from."""
    lines = []
    for field in dataclasses.fields(cfg):
        if field.name in sources or field.name in CONVENTION_ENV:
            source = sources.get(field.name, "not set: sbatch's own default")
            lines.append(f"# {field.name.replace('_', '-')} = {getattr(cfg, field.name)!r}  ({source})")
    return lines


def main(argv: list[str] | None = None) -> int:
    sources: dict[str, str] = {}
    try:
        cfg = load(argv, sources=sources)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        print("\n".join(describe_sources(cfg, sources)))
        for key, value in job_environment(cfg).items():
            print(f"export {key}={shlex.quote(value)}")
        print(shlex.join(sbatch_command(cfg)))
        return 0
    try:
        job_id = submit(cfg)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    job_dir = cfg.output_path / job_id
    print(f"submitted job {job_id} ({cfg.node_count} node(s) x {cfg.workers_per_node} worker(s))", flush=True)
    print(f"output {cfg.output_path}/slurm-{job_id}.out, files in {job_dir}", flush=True)
    if not cfg.wait:
        print(f"when it runs: python -m slurm.connection show {job_dir}   (or rerun with --wait)")
        return 0
    return wait_until_ready(cfg, job_id)


if __name__ == "__main__":
    sys.exit(main())
