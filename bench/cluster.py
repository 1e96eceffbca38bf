"""Start fake-engine workers and a balancer for a benchmark, wait until they answer, stop them by group.

Benchmarks that measure a whole deployment (scaling, overhead, the bench tests) need throwaway clusters on
free ports. Every process runs in its own session, logs to a file under the run's directory, and is stopped by
signalling its process group, never by name. Used as `with LocalCluster(spec) as cluster: cluster.lb_url`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """This checkout importable, one torch/BLAS thread per process (2 cores are shared by everything)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return int(resp.status)


class Process:
    """One child in its own process group, output to `log_path`."""

    def __init__(self, args: Sequence[str], log_path: Path, name: str, code_dir: Path = REPO_ROOT) -> None:
        """`code_dir`: the checkout the child imports (another one, e.g. an older commit, to compare)."""
        self.args = list(args)
        self.name = name
        self.log_path = log_path
        path = os.pathsep.join(filter(None, [str(code_dir), os.environ.get("PYTHONPATH")]))
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=child_env(PYTHONPATH=path), cwd=code_dir,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, url: str, timeout: float = 60.0) -> None:
        """Poll `url` until it answers 200; raise with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                if _http_status(url) == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {url} not ready after {timeout}s:\n{self.log_tail()}")

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL what is left after `timeout`; returns the leader's exit code."""
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        self._signal_group(signal.SIGKILL)  # stragglers in the group, even when the leader has exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        return self.popen.returncode


def stop_all(processes: Sequence[Process], timeout: float = 10.0) -> None:
    """SIGTERM every group at once (shutdowns overlap), then reap each within the shared deadline."""
    for proc in processes:
        proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in processes:
        proc.stop(max(0.0, deadline - time.monotonic()))


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `with LocalCluster(...)` and `finally` blocks stop what was started
    (a background job cannot be interrupted with SIGINT: non-interactive shells ignore it for `&` jobs)."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def start_balancer(
    worker_urls: Sequence[str],
    policy: str,
    log_path: Path,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
    code_dir: Path = REPO_ROOT,
) -> tuple[Process, str]:
    """`python -m lb` (from `code_dir`) on a free port in front of `worker_urls`, ready (/health is 200)."""
    port = free_port()
    args = [
        sys.executable, "-m", "lb", "--host", "127.0.0.1", "--port", str(port),
        "--workers", ",".join(worker_urls), "--policy", policy, *extra_args,
    ]
    proc = Process(args, log_path, "balancer", code_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(url + "/health", timeout)
    except BaseException:
        proc.stop()
        raise
    return proc, url


@dataclass(frozen=True)
class WorkerSpec:
    """One fake-engine worker. Latencies in seconds, imitating a batching GPU (see workers' fake engine)."""

    prefill_latency: float = 0.0  # once per admitted batch
    step_latency: float = 0.0  # per decode step, whatever the batch size
    per_seq_latency: float = 0.0  # per decode step, per sequence in the batch
    batch_size: int = 8
    extra_args: tuple[str, ...] = ()

    def args(self, port: int, model: str) -> list[str]:
        return [
            sys.executable, "-m", "workers", "--engine", "fake", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", model, "--batch-size", str(self.batch_size),
            "--fake-prefill-latency", str(self.prefill_latency),
            "--fake-step-latency", str(self.step_latency),
            "--fake-per-seq-latency", str(self.per_seq_latency), *self.extra_args,
        ]


@dataclass(frozen=True)
class ClusterSpec:
    workers: tuple[WorkerSpec, ...]
    policy: str = "round_robin"
    model: str = "fake-model"
    lb_args: tuple[str, ...] = ()  # extra `python -m lb` flags
    with_balancer: bool = True
    log_dir: Path | None = None  # default: a fresh temporary directory
    startup_timeout: float = 60.0
    worker_ports: tuple[int, ...] = field(default=())  # default: free ports


class LocalCluster:
    """N workers + `python -m lb` on 127.0.0.1; a context manager that always stops what it started."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.log_dir = spec.log_dir or Path(tempfile.mkdtemp(prefix="ib-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[Process] = []
        self.worker_urls: list[str] = []
        self.balancer: Process | None = None
        self.lb_url = ""

    def start(self) -> LocalCluster:
        try:
            ports = list(self.spec.worker_ports) or [free_port() for _ in self.spec.workers]
            # Start every worker first, then wait: their start-ups overlap.
            for i, (worker, port) in enumerate(zip(self.spec.workers, ports, strict=True)):
                args = worker.args(port, self.spec.model)
                proc = Process(args, self.log_dir / f"worker-{i}.log", f"worker {i}")
                self.workers.append(proc)
                self.worker_urls.append(f"http://127.0.0.1:{port}")
            for proc, url in zip(self.workers, self.worker_urls, strict=True):
                proc.wait_ready(url + "/health", self.spec.startup_timeout)
            if self.spec.with_balancer:
                self.balancer, self.lb_url = start_balancer(
                    self.worker_urls, self.spec.policy, self.log_dir / "lb.log", self.spec.lb_args,
                    self.spec.startup_timeout,
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Balancer first (it stops routing), then the workers; each by its process group."""
        if self.balancer is not None:
            self.balancer.stop()
        stop_all(self.workers)

    def processes(self) -> list[Process]:
        return [*self.workers, *([self.balancer] if self.balancer else [])]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
