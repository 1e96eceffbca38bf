"""A real SLURM cluster for tests: munged, slurmctld and one slurmd per simulated node, all in a tmp dir.

Follows /work/shared/slurm-local.md: munge on a private socket, fake GPUs as `mknod c 1 3` character devices
(so SLURM itself sets CUDA_VISIBLE_DEVICES), several `slurmd -N nodeX` on this one host with distinct ports,
and `KillWait=5` so a cancelled job's processes get SIGTERM, then SIGKILL 5 s later. Every daemon is stopped
by the pid in the pid file it wrote; nothing is found by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import free_port

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def missing_reason() -> str | None:
    """Why a local SLURM cannot run here (None when it can): the tests skip with this text."""
    if os.geteuid() != 0:
        return "SLURM tests need root (slurmd runs jobs as root here); see scripts/prepare_system_tests.sh"
    absent = [cmd for cmd in DAEMONS if not _which(cmd)]
    if absent:
        return (f"SLURM tests need slurm-wlm and munge ({', '.join(absent)} not found): "
                "run scripts/prepare_system_tests.sh as root")
    return None


def _which(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path="/usr/sbin:/sbin")


@dataclass
class SlurmCluster:
    """A running local cluster; `env` is what clients (sbatch, squeue, the submit script) need."""

    root: Path
    nodes: list[str]
    gpus_per_node: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    def run(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, check=check,
        )

    def job_state(self, job_id: str) -> str | None:
        """The job's state (PENDING, RUNNING, CANCELLED, ...), or None once SLURM forgot it."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return None

    def wait_job_gone(self, job_id: str, timeout: float = 30.0) -> None:
        """Wait until `squeue` no longer lists the job (it finished, failed or was cancelled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
                return
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still in squeue after {timeout}s")

    def log_tails(self, lines: int = 30) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)


def _write_config(root: Path, nodes: list[str], gpus_per_node: int) -> dict[str, int]:
    host = socket.gethostname().split(".")[0]
    mem_mib = max(1024, _mem_total_mib() // len(nodes) - 1024)
    cpus = os.cpu_count() or 1
    ports = {"ctld": free_port(), **{node: free_port() for node in nodes}}
    node_lines = [
        f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[node]} CPUs={cpus} "
        f"RealMemory={mem_mib} Gres=gpu:{gpus_per_node} State=UNKNOWN"
        for node in nodes
    ]
    conf = f"""\
ClusterName=ibtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports["ctld"]}
SlurmdPort={ports[nodes[0]]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/run/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
GresTypes=gpu
{chr(10).join(node_lines)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    gres = ["AutoDetect=off"]
    for node in nodes:
        devdir = root / "fakedev" / node
        devdir.mkdir(parents=True)
        for i in range(gpus_per_node):
            # char devices with /dev/null's numbers: SLURM only binds GPUs whose File= is a device
            os.mknod(devdir / f"nvidia{i}", 0o666 | 0o020000, os.makedev(1, 3))
        gres.append(f"NodeName={node} Name=gpu File={devdir}/nvidia[0-{gpus_per_node - 1}]")
    (root / "etc" / "slurm.conf").write_text(conf)
    (root / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")
    return ports


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_for(path: Path, timeout: float, what: str, cluster: SlurmCluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.05)
    tails = cluster.log_tails() if cluster else ""
    raise RuntimeError(f"{what} did not start (no {path}):\n{tails}")


def _stop_pids(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM the daemons we started (all at once: each takes ~1-2 s), SIGKILL any that linger."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _is_alive(pid)]
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_cluster(root: Path, nodes: int = 2, gpus_per_node: int = 2) -> SlurmCluster:
    """Start munged, slurmctld and `nodes` slurmd daemons under `root`; returns once every node is idle."""
    names = [f"node{i + 1}" for i in range(nodes)]
    for sub in ("etc", "state", "log", "run", "munge", *[f"spool/{n}" for n in names]):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    os.chmod(root / "run", 0o755)  # munged needs its socket directory to be o+x
    cluster = SlurmCluster(root, names, gpus_per_node)
    cluster.env = {**os.environ, "SLURM_CONF": str(cluster.conf)}
    _write_config(root, names, gpus_per_node)

    try:
        _start_daemons(cluster)
    except BaseException:
        stop_cluster(cluster)  # whatever did start must not outlive the failure
        raise
    return cluster


def _start_daemons(cluster: SlurmCluster) -> None:
    root = cluster.root
    key = root / "munge" / "munge.key"
    mungekey = _which("mungekey") or "mungekey"
    subprocess.run([mungekey, "--create", f"--keyfile={key}", "--bits=1024"], check=True)
    os.chmod(key, 0o400)
    subprocess.run(
        [_which("munged") or "munged", f"--key-file={key}", f"--socket={root}/run/munge.socket",
         f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
         f"--seed-file={root}/munge/munged.seed"],
        check=True, env=cluster.env,
    )
    _wait_for(root / "run" / "munged.pid", 10, "munged")
    # The daemons daemonize themselves and write their pid files; we keep no Popen handles.
    subprocess.run([_which("slurmctld") or "slurmctld"], check=True, env=cluster.env)
    _wait_for(root / "run" / "slurmctld.pid", 10, "slurmctld", cluster)
    for name in cluster.nodes:
        subprocess.run([_which("slurmd") or "slurmd", "-N", name], check=True, env=cluster.env)
        _wait_for(root / "run" / f"slurmd-{name}.pid", 10, f"slurmd {name}", cluster)
    _wait_idle(cluster, timeout=30)


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        idle = {line.split()[0] for line in states.splitlines() if line.split()[1:] == ["idle"]}
        if idle >= set(cluster.nodes):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nodes not idle after {timeout}s: {states!r}\n{cluster.log_tails()}")


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel every job of this cluster, then stop the daemons we started, by their pid files."""
    jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
    if jobs:
        cluster.run("scancel", *jobs, check=False)
        for job in jobs:
            with contextlib.suppress(TimeoutError):
                cluster.wait_job_gone(job, timeout=20)
    run = cluster.root / "run"
    pid_files = [run / f"slurmd-{name}.pid" for name in cluster.nodes]
    pid_files += [run / "slurmctld.pid", run / "munged.pid"]
    _stop_pids([pid for pid in map(_pid_from, pid_files) if pid is not None])


def local_cluster(nodes: int = 2, gpus_per_node: int = 2) -> Iterator[SlurmCluster]:
    """Generator for a pytest fixture: start in a fresh directory, yield, always stop and clean up."""
    # Not pytest's tmp_path: munged refuses a socket below a directory that is not o+x; pytest's are 0700.
    root = Path(tempfile.mkdtemp(prefix="ib-slurm-"))
    os.chmod(root, 0o755)
    cluster = start_cluster(root, nodes, gpus_per_node)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(root, ignore_errors=True)
