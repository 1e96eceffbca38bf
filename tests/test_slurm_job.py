"""The SLURM job end to end, on real slurmctld/slurmd daemons with fake GPUs (tests/slurm_cluster.py).

Each test submits with `slurm/start_multi_gpu_slurm.sh --wait`, as a user would, then checks what runs: the
OpenAI SDK through an SSH tunnel, the workers' CUDA_VISIBLE_DEVICES as SLURM set them, both nodes' workers in
the balancer, and no process left after `scancel`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import slurm_cluster, ssh_tunnel
from tests.processes import REPO_ROOT, free_port
from tests.processes import test_env as child_env
from tests.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.system, pytest.mark.slurm]

SUBMIT = REPO_ROOT / "slurm" / "start_multi_gpu_slurm.sh"
KILL_WAIT_S = 5  # the test cluster's KillWait: SIGTERM, then SIGKILL this much later


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    reason = slurm_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    yield from slurm_cluster.local_cluster(nodes=2, gpus_per_node=2)


@dataclass
class Job:
    id: str
    dir: Path
    connection: dict[str, Any]
    admin_token: str

    def stats(self) -> dict[str, Any]:
        return _get_json(f"{self.connection['url']}/stats", self.admin_token)


def run_submit(cluster: SlurmCluster, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`start_multi_gpu_slurm.sh --wait` against the test cluster, ports chosen for this machine."""
    # sbatch exports this environment to the job; the balancer reads IB_LB_* settings from it
    env = child_env(SLURM_CONF=str(cluster.conf), IB_PYTHON=sys.executable, IB_LB_HEALTH_CHECK_INTERVAL="1")
    lb_port, base_port = _quiet_ports()
    cmd = ["bash", str(SUBMIT), "--output-dir", str(out), "--node-addr", "127.0.0.1",
           "--port", str(lb_port), "--worker-base-port", str(base_port), "--login-host", "127.0.0.1",
           "--wait", "--wait-timeout", "120", "--ready-timeout", "120", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def submit(cluster: SlurmCluster, out: Path, *args: str) -> Job:
    """Submit and wait for readiness like a user; fail with the job's logs if it does not come up."""
    result = run_submit(cluster, out, *args)
    first = result.stdout.split()
    job_id = first[2] if first[:2] == ["submitted", "job"] else ""
    if result.returncode != 0:
        raise AssertionError(f"submit failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                             f"{_job_logs(out, job_id)}\n{cluster.log_tails()}")
    job_dir = out / job_id
    connection = json.loads((job_dir / "connection.json").read_text())
    assert "ssh -N -L 8000:127.0.0.1:" in result.stdout and "from openai import OpenAI" in result.stdout
    return Job(job_id, job_dir, connection, (job_dir / "admin_token").read_text().strip())


def _quiet_ports() -> tuple[int, int]:
    """(balancer port, worker base port) below the kernel's ephemeral range, every port the job uses free.

    Workers bind seconds after the launcher checked their port (the model loads first); in the ephemeral
    range a client socket of a concurrent test could take it meanwhile, so the job's ports come from below.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        lb_port = random.randrange(20000, low - 200)
        base = lb_port + 1
        # two nodes with up to four workers each: node k starts at base + 100*k
        wanted = [lb_port, *range(base, base + 4), *range(base + 100, base + 104)]
        if all(_port_is_free(port) for port in wanted):
            return lb_port, base
    raise RuntimeError("no free block of ports below the ephemeral range")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _job_logs(out: Path, job_id: str) -> str:
    if not job_id:
        return ""
    parts = []
    for log in [out / f"slurm-{job_id}.out", *sorted((out / job_id).rglob("*.log"))]:
        if log.exists():
            parts.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(parts)


def _get_json(url: str, token: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def _job_processes(job: Job) -> list[psutil.Process]:
    """The job's processes, found from outside: SLURM_JOB_ID in their environment or the job dir in argv."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        env = proc.info["environ"] or {}
        cmdline = " ".join(proc.info["cmdline"] or [])
        if env.get("SLURM_JOB_ID") == job.id or str(job.dir) in cmdline:
            found.append(proc)
    return found


def test_two_gpu_job_serves_the_tiny_model_through_an_ssh_tunnel(
    slurm: SlurmCluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    reason = ssh_tunnel.missing_reason()
    if reason:
        pytest.skip(reason)
    job = submit(slurm, tmp_path / "jobs", "--gpus", "2", "--engine", "hf",
                 "--model-path", str(tiny_model_dir), "--batch-size", "4")
    assert job.connection["ready"] and job.connection["healthy_workers"] == 2
    sshd = ssh_tunnel.SshServer(tmp_path / "sshd")
    local_port = free_port()
    target = (job.connection["address"], job.connection["port"])
    tunnel = sshd.tunnel(local_port, *target, tmp_path / "tunnel.log")
    try:
        from openai import OpenAI

        base_url = f"http://127.0.0.1:{local_port}/v1"
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for i in range(4):
            completion = client.completions.create(model=model, prompt=f"Hello {i}", max_tokens=8)
            assert completion.choices[0].text and completion.usage and completion.usage.completion_tokens > 0
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8)
        assert chat.choices[0].message.content is not None
    finally:
        tunnel.stop()
        sshd.stop()

    # Each worker runs on one of the GPUs SLURM allocated: CUDA_VISIBLE_DEVICES "0" and "1", one each.
    stats = job.stats()
    seen = sorted(_get_json(f"{w['url']}/health")["cuda_visible_devices"] for w in stats["workers"])
    assert seen == ["0", "1"]
    assert sum(w["requests_served"] for w in stats["workers"]) >= 5
    slurm.run("scancel", job.id)
    slurm.wait_job_gone(job.id)


def test_two_node_job_puts_workers_on_both_nodes(slurm: SlurmCluster, tmp_path: Path) -> None:
    job = submit(slurm, tmp_path / "jobs", "--gpus", "4", "--nodes", "2", "--engine", "fake")
    stats = job.stats()
    assert stats["total_workers"] == 4 and stats["healthy_workers"] == 4
    ports = sorted(int(w["url"].rsplit(":", 1)[1]) for w in stats["workers"])
    # node k's workers start at base + 100*k: two on node 0, two on node 1
    assert ports[1] - ports[0] < 100 and ports[2] - ports[0] >= 100 and ports[3] - ports[2] < 100
    nodes_ran = sorted(p.name for p in job.dir.glob("node-*") if any(p.iterdir()))
    assert nodes_ran == ["node-0", "node-1"]
    assert "node2" in (job.dir / "node-1" / "task.log").read_text().splitlines()[0]  # SLURMD_NODENAME
    devices = sorted(_get_json(f"{w['url']}/health")["cuda_visible_devices"] for w in stats["workers"])
    assert devices == ["0", "0", "1", "1"]
    # The job's admin token is on no command line (ps shows them to every user of the node), and being on the
    # node's loopback does not replace it: an unauthenticated POST /workers is refused.
    for proc in _job_processes(job):
        with contextlib.suppress(psutil.Error):
            assert job.admin_token not in " ".join(proc.cmdline()), proc.cmdline()
    request = urllib.request.Request(f"http://127.0.0.1:{job.connection['port']}/workers", method="POST",
                                     data=json.dumps({"url": stats["workers"][0]["url"]}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401

    # A worker on the second node dies: its node task restarts it and the balancer takes it back.
    victim = json.loads((job.dir / "node-1" / "cluster.json").read_text())["workers"][0]
    victim_url = next(w["url"] for w in stats["workers"] if w["url"].endswith(f":{victim['port']}"))
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        backend = next(w for w in job.stats()["workers"] if w["url"] == victim_url)
        try:
            new_pid = _get_json(f"{victim_url}/health")["pid"]
        except OSError:
            new_pid = None
        if backend["healthy"] and new_pid not in (None, victim["pid"]):
            break
        assert time.monotonic() < deadline, f"worker not restarted and re-added: {backend}"
        time.sleep(0.5)
    slurm.run("scancel", job.id)
    slurm.wait_job_gone(job.id)


def _complete_in_background(url: str, max_tokens: int) -> tuple[threading.Thread, list[Any]]:
    """POST one completion from a thread; its JSON body (or the exception) lands in the returned list."""
    outcome: list[Any] = []
    body = json.dumps({"model": "fake-model", "prompt": "drain me", "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()

    def run() -> None:
        request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                outcome.append(json.loads(resp.read()))
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_scancel_drains_in_flight_requests_then_stops_every_process(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    # CPU workers (no GRES requested), two per node; 40 tokens at 50 ms per decode step make a request that
    # is still running when scancel arrives (KillWait is 5 s)
    job = submit(slurm, tmp_path / "jobs", "--cpu-workers", "2", "--nodes", "2", "--engine", "fake",
                 "--engine-args=--fake-step-latency 0.05")
    workers = job.stats()["workers"]
    assert len(workers) == 4
    assert all(not _get_json(f"{w['url']}/health")["cuda_visible_devices"] for w in workers)
    before = _job_processes(job)
    commands = [" ".join(p.cmdline()) for p in before]
    # the balancer and one launcher per node are among them (workers are the launchers' children)
    assert any("-m lb" in c for c in commands) and sum("scripts.launch" in c for c in commands) == 2
    assert sum("-m workers" in c for c in commands) == 4, commands

    thread, outcome = _complete_in_background(job.connection["url"], max_tokens=40)
    deadline = time.monotonic() + 10
    while job.stats()["workers"] and not any(w["in_flight"] for w in job.stats()["workers"]):
        assert time.monotonic() < deadline, "the request never reached a worker"
        time.sleep(0.05)
    slurm.run("scancel", job.id)
    thread.join(timeout=20)
    assert outcome and not isinstance(outcome[0], Exception), outcome
    assert outcome[0]["usage"]["completion_tokens"] == 40  # the balancer and the worker let it finish

    slurm.wait_job_gone(job.id)
    _gone, alive = psutil.wait_procs(before, timeout=KILL_WAIT_S + 5)
    assert not alive, f"still running after scancel: {[' '.join(p.cmdline()) for p in alive]}"
    deadline = time.monotonic() + 5
    while _job_processes(job) and time.monotonic() < deadline:
        time.sleep(0.2)  # a process forked during the shutdown sweep would show up here
    assert not _job_processes(job)
    assert slurm.job_state(job.id) == "CANCELLED"
    assert not (job.dir / "connection.json").exists()


def test_a_job_whose_workers_cannot_start_fails_the_wait_with_their_error(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    # a setting the worker rejects: it exits at once (as a bad model path would, after loading torch)
    result = run_submit(slurm, tmp_path / "jobs", "--gpus", "2", "--engine", "fake",
                        "--engine-args=--max-model-len 1")
    assert result.returncode == 1
    # what --wait printed: the job ended, and why (the node task's launch error with the worker's log tail)
    assert "ended before it was ready" in result.stderr and "launcher exited with 1" in result.stderr


@pytest.mark.skipif(not (os.environ.get("IB_SLOW_TESTS") or os.environ.get("CI") == "true"),
                    reason="~95 s (SLURM's time limit has minute granularity and is checked every 30 s); "
                    "runs with CI=true or IB_SLOW_TESTS=1")
def test_time_limit_stops_the_job_like_scancel(slurm: SlurmCluster, tmp_path: Path) -> None:
    job = submit(slurm, tmp_path / "jobs", "--gpus", "2", "--engine", "fake", "--time", "1")
    before = _job_processes(job)
    slurm.wait_job_gone(job.id, timeout=180)
    assert slurm.job_state(job.id) == "TIMEOUT"
    _gone, alive = psutil.wait_procs(before, timeout=KILL_WAIT_S + 5)
    assert not alive and not _job_processes(job)
    assert "lb: stopped" in (job.dir / "lb.log").read_text()  # it drained and exited, it was not killed
