"""`LocalCluster`: workers (one per GPU, or CPU workers) plus the balancer on this machine, from Python.

    with LocalCluster(model_path="...", cpu_workers=2, engine="hf") as cluster:
        client = openai.OpenAI(base_url=cluster.openai_base_url, api_key="none")

Start-up order: pick GPUs and ports → start every worker (own process group, own log) → wait until all pass
their health check (a worker that exits or times out fails the launch with its log tail) → register them
with an outside balancer if asked → start the balancer and wait for it → write cluster.json → heartbeat.
Stop order: heartbeat → balancer (drains) → workers → verify by pid that nothing is left → remove the file.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from lb.settings import from_mapping
from scripts import credentials, run_dir
from scripts.cluster_config import ClusterConfig
from scripts.commands import (
    WorkerSpec,
    balancer_command,
    balancer_env,
    probe_host,
    url_host,
    worker_command,
    worker_env,
)
from scripts.gpus import visible_gpus, worker_gpus
from scripts.ports import PortAllocator
from scripts.process_group import alive, snapshot, stop_groups
from scripts.registration import register_worker
from scripts.supervisor import ChildProcess, RestartPolicy, Supervisor, http_ok

log = logging.getLogger("scripts.cluster")


class LaunchError(RuntimeError):
    """The cluster could not start; the message carries the failing process's log tail."""


@dataclass(frozen=True)
class StopReport:
    checked: int  # processes (pid + start time) recorded just before stopping
    left: list[int]  # pids still alive after SIGKILL: should always be empty

    def describe(self) -> str:
        if self.left:
            return f"WARNING: {len(self.left)} process(es) still alive: {self.left}"
        return f"verified by pid: none of the {self.checked} cluster processes is left"


class LocalCluster:
    """Start, watch and stop one machine's workers and balancer. Not reusable after `stop()`."""

    def __init__(self, model_path: str | Path | None = None, *, gpus: int | list[int] | None = None,
                 config: ClusterConfig | None = None, report: Callable[[str], None] | None = None,
                 launcher_kind: str = "api", **settings: Any) -> None:
        if config is None:
            values: dict[str, Any] = dict(settings)
            if model_path is not None:
                values["model_path"] = str(model_path)
            if isinstance(gpus, list | tuple):
                values["gpu_ids"] = ",".join(map(str, gpus))
            elif gpus is not None:
                values["gpus"] = gpus
            config = from_mapping(ClusterConfig, values, "LocalCluster arguments")
        self.config = config
        self.report = report or log.info
        self.launcher_kind = launcher_kind
        self.specs: list[WorkerSpec] = []
        self.workers: list[ChildProcess] = []
        self.balancer: ChildProcess | None = None
        self.lb_port: int | None = None
        self.port_substitutions: list[str] = []
        self.supervisor: Supervisor | None = None
        self.credentials: credentials.Credentials | None = None  # the balancer's token and key files
        self.run_file = run_dir.cluster_file(config.run_dir)
        self.started_at: float | None = None
        self._stopped = False
        self._wrote_run_file = False

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> LocalCluster:
        report = overrides.pop("report", None)
        return cls(config=ClusterConfig.from_yaml(path, **overrides), report=report)

    # --- where to reach it ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.lb_port is None:
            raise RuntimeError("the balancer is not running (not started, or --workers-only)")
        return f"http://{url_host(self.config.host)}:{self.lb_port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def worker_urls(self) -> list[str]:
        return [spec.url for spec in self.specs]

    # --- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        if self.started_at is not None:
            raise RuntimeError("a LocalCluster starts once; create a new one")
        self.started_at = time.time()
        try:
            self._start()
        except BaseException:
            self.stop()  # Ctrl-C or a failed worker during start-up: leave nothing behind
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.startup_timeout
        run_dir.refuse_if_live(self.run_file)
        gpu_sets = worker_gpus(gpus=cfg.gpus, gpu_ids=cfg.gpu_ids, cpu_workers=cfg.cpu_workers,
                               gpus_per_worker=cfg.gpus_per_worker, visible=visible_gpus())
        workers_ports = PortAllocator(cfg.worker_host, cfg.skip_port_numbers)
        if not cfg.workers_only:
            lb_ports = PortAllocator(cfg.host, cfg.skip_port_numbers)
            self.lb_port = lb_ports.take(cfg.port, "balancer")
            workers_ports.taken.add(self.lb_port)
            self.port_substitutions += lb_ports.substitutions
        ports = workers_ports.take_run(cfg.worker_base_port, len(gpu_sets), "worker")
        self.port_substitutions += workers_ports.substitutions
        for line in self.port_substitutions:
            self.report(line)
        self.specs = [WorkerSpec(i, gpus, port, cfg.worker_host) for i, (gpus, port) in
                      enumerate(zip(gpu_sets, ports, strict=True))]
        log_dir = Path(cfg.log_dir).expanduser().resolve()
        # Build every command first, so a config error (say, nsys missing) fails before anything starts.
        self.workers = [ChildProcess(f"worker {s.index}", worker_command(cfg, s), worker_env(cfg, s),
                                     log_dir / f"worker-{s.index}.log", s.probe_url + cfg.health_path)
                        for s in self.specs]
        for spec, child in zip(self.specs, self.workers, strict=True):
            child.start()
            gpu = f"GPU {spec.gpus}" if spec.gpus else "CPU"
            self.report(f"worker {spec.index}: {gpu}, port {spec.port}, pid {child.pid}, "
                        f"log {child.log_path}")
        self._write_run_file()
        self._wait_healthy(self.workers, deadline)
        self.report(f"all {len(self.workers)} workers are healthy")
        if cfg.register_with:
            for spec in self.specs:
                register_worker(cfg.register_with, spec.url, cfg.admin_token, deadline)
                self.report(f"worker {spec.index} registered with {cfg.register_with} as {spec.url}")
        if not cfg.workers_only:
            assert self.lb_port is not None
            self.credentials = credentials.prepare(cfg, self.run_file.parent)
            flags = self.credentials.balancer_flags()
            logs = [("balancer", str(log_dir / "balancer.log"))]
            logs += [(f"worker-{s.index}", str(w.log_path))
                     for s, w in zip(self.specs, self.workers, strict=True)]
            argv = balancer_command(cfg, self.lb_port, self.worker_urls, flags, logs)
            self.balancer = ChildProcess(
                "balancer", argv, balancer_env(cfg), log_dir / "balancer.log", f"http://{probe_host(cfg.host)}:{self.lb_port}/health")
            self.balancer.start()
            self._write_run_file()
            self._wait_healthy([self.balancer], max(deadline, time.monotonic() + 60))
        self._write_run_file()
        self.supervisor = Supervisor(
            [*self.workers, *([self.balancer] if self.balancer else [])], cfg.health_check_interval,
            RestartPolicy(cfg.restart, cfg.max_restarts, cfg.restart_backoff_max), self.report,
            on_restart=lambda child: self._write_run_file(), run_file=self.run_file)
        self.supervisor.start()

    def _wait_healthy(self, children: list[ChildProcess], deadline: float) -> None:
        pending = list(children)
        while pending:
            for child in list(pending):
                code = child.exit_code()
                if code is not None:
                    raise LaunchError(f"{child.name} exited with code {code} during start-up; last lines of "
                                      f"{child.log_path}:\n{child.log_tail()}")
                if child.probe():
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail()}" for c in pending)
                raise LaunchError(f"not healthy after {self.config.startup_timeout:.0f} s "
                                  f"(--startup-timeout): "
                                  f"{', '.join(c.name for c in pending)}\n{tails}")
            if pending:
                time.sleep(0.25)

    def stop(self) -> StopReport:
        """Balancer first (it drains), then every worker group at once; then check by pid. Idempotent."""
        if self._stopped:
            return StopReport(0, [])
        self._stopped = True
        if self.supervisor is not None:
            self.supervisor.stop()
        started = [c for c in [self.balancer, *self.workers] if c is not None and c.popen is not None]
        keys = snapshot([c.pid for c in started if c.pid], [c.pid for c in started if c.pid])
        if self.balancer is not None and self.balancer.popen is not None:
            self.report("stopping the balancer (it drains in-flight requests)")
            self.balancer.stop(self.config.stop_timeout)
        running = [w for w in self.workers if w.popen is not None]
        if running:
            self.report(f"stopping {len(running)} workers")
            stop_groups([w.pid for w in running if w.pid], keys, self.config.stop_timeout)
            for worker in running:
                worker.stop(1.0)  # reaps the leader; the group is already gone
        report = StopReport(len(keys), [p.pid for p in alive(keys)])
        for path in (self.run_file, self.run_file.with_name(self.run_file.name + run_dir.STOPPING_SUFFIX)):
            if self._owns(path):
                path.unlink(missing_ok=True)
        if self.credentials is not None:
            self.credentials.remove()
        if started:
            self.report(report.describe())
        return report

    # --- status --------------------------------------------------------------------------------------
    def health(self) -> list[dict[str, Any]]:
        """The heartbeat's latest view of each worker (and the balancer)."""
        rows = []
        for spec, child in zip(self.specs, self.workers, strict=False):
            rows.append({"name": child.name, "index": spec.index, "url": spec.url, "gpus": spec.gpus,
                         "pid": child.pid, "running": child.exit_code() is None and child.popen is not None,
                         "healthy": child.healthy, "restarts": child.restarts,
                         "last_check": child.last_check})
        if self.balancer is not None:
            rows.append({"name": "balancer", "index": None, "url": self.url, "gpus": None,
                         "pid": self.balancer.pid, "running": self.balancer.exit_code() is None,
                         "healthy": self.balancer.healthy, "restarts": self.balancer.restarts,
                         "last_check": self.balancer.last_check})
        return rows

    def is_healthy(self) -> bool:
        children = [*self.workers, *([self.balancer] if self.balancer else [])]
        return all(http_ok(c.health_url) for c in children)

    @property
    def stopped_from_outside(self) -> bool:
        return self.supervisor is not None and self.supervisor.stopped_from_outside.is_set()

    def _owns(self, path: Path) -> bool:
        """This cluster wrote `path` (not merely this process: two clusters may share a process)."""
        if not self._wrote_run_file:
            return False
        try:
            return int(run_dir.read(path).get("launcher", {}).get("pid", -1)) == os.getpid()
        except run_dir.RunDirError:
            return False

    def _write_run_file(self) -> None:
        if self.stopped_from_outside or self._stopped:
            return
        cfg = self.config
        record: dict[str, Any] = {
            "version": 1, "started_at": self.started_at,
            "launcher": {**run_dir.process_info(os.getpid()), "kind": self.launcher_kind},
            "lb": None, "workers": [],
        }
        if self.balancer is not None and self.balancer.pid:
            record["lb"] = {**run_dir.process_info(self.balancer.pid), "port": self.lb_port, "url": self.url,
                            "probe_url": f"http://{probe_host(cfg.host)}:{self.lb_port}",
                            "log": str(self.balancer.log_path), "restarts": self.balancer.restarts}
        for spec, child in zip(self.specs, self.workers, strict=True):
            if child.pid is None:
                continue
            record["workers"].append({
                **run_dir.process_info(child.pid), "index": spec.index, "port": spec.port, "url": spec.url,
                "probe_url": spec.probe_url, "health_path": cfg.health_path, "gpus": spec.gpus,
                "engine": "custom" if cfg.worker_cmd else cfg.engine, "model": cfg.served_model_name
                or cfg.model_path, "log": str(child.log_path), "restarts": child.restarts})
        run_dir.write_atomic(self.run_file, record)
        self._wrote_run_file = True


def create_cluster(config: ClusterConfig | Mapping[str, Any] | str | Path | None = None,
                   **settings: Any) -> LocalCluster:
    """A LocalCluster from a ClusterConfig, a mapping of settings, or a YAML path; keywords override."""
    if isinstance(config, ClusterConfig):
        if settings:
            config = from_mapping(ClusterConfig, {**config.__dict__, **settings})
        return LocalCluster(config=config)
    if isinstance(config, str | Path):
        return LocalCluster.from_yaml(config, **settings)
    return LocalCluster(**{**dict(config or {}), **settings})
