"""`InferenceServer`: one engine server (vLLM, SGLang, our worker, or a subclass of your own) from Python.

    args = {"api_server_args": {"max-model-len": 4096}}
    with VLLMServer(model="/models/llama", port=8000, config=args) as s:
        client = openai.OpenAI(base_url=s.openai_base_url, api_key="none")

Built on the launcher's pieces: the server runs as a `ChildProcess` in its own process group with its own log
file, `start()` waits for its health endpoint, a `Heartbeat` thread watches it, and `stop()` stops the group
(SIGTERM, then SIGKILL after `stop_timeout`) and checks by (pid, start time) that nothing is left. A subclass
supplies four methods: `get_binary_path`, `get_launch_command`, `get_health_endpoint`, `list_endpoints`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import psutil

from lb.settings import ConfigError
from scripts.commands import probe_host, url_host
from scripts.heartbeat import Heartbeat
from scripts.process_group import ProcessKey, alive, group_members, snapshot, stop_groups
from scripts.profilers import Profile
from scripts.seed_yaml import server_args
from scripts.supervisor import ChildProcess, http_ok

log = logging.getLogger("scripts.server")
SERVER_ID_ENV = "IB_SERVER_ID"  # set in the server's environment: its processes carry it, orphans too
OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


class ServerStartError(RuntimeError):
    """The server exited or did not pass its health check in time; the message carries its log tail."""


@dataclass(frozen=True)
class StopReport:
    """What `stop()` found: processes recorded over the server's life, and any still alive afterwards."""

    checked: int
    left: list[int]  # pids of recorded processes still alive after SIGKILL
    group_left: list[int]  # pids still in the server's process group
    orphans: list[int]  # pids anywhere on the machine carrying this server's id (debug_mode only)

    @property
    def clean(self) -> bool:
        return not (self.left or self.group_left or self.orphans)

    def describe(self) -> str:
        if self.clean:
            return f"verified by pid: none of the {self.checked} processes of the server is left"
        return (f"WARNING: processes left after stop: recorded {self.left}, in its process group "
                f"{self.group_left}, orphans carrying its id {self.orphans}")


def alive_members(pgid: int) -> list[psutil.Process]:
    """Processes still in the group, zombies aside (they hold only a pid until someone reaps them)."""
    members = []
    for proc in group_members([pgid]):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except psutil.Error:
            continue
    return members


def profile_from(value: Profile | Mapping[str, Any] | None) -> Profile:
    """A `Profile` from the module's `profile: {enabled, tool, output_dir, args}` mapping."""
    if value is None or isinstance(value, Profile):
        return value or Profile()
    unknown = sorted(set(map(str, value)) - {"enabled", "tool", "output_dir", "args"})
    if unknown:
        raise ConfigError(f"unknown key profile.{unknown[0]}; known keys: args, enabled, output_dir, tool")
    return Profile(bool(value.get("enabled", False)), str(value.get("tool", "nsys")),
                   str(value.get("output_dir", "profiles")), server_args(value.get("args"), "profile.args"))


class InferenceServer:
    """Start, watch and stop one server process. Not reusable after `stop()`.

    `config` holds the server's own arguments under the key its backend reads (`api_server_args` for vLLM,
    `server_args` for SGLang and our worker), as a list, a dict or a list mixing both (flags as `True`, dict
    values JSON-encoded, underscores turned into dashes). `heartbeat_timeout`: seconds of failed health
    checks after which `healthy` turns False and `on_unhealthy(server)` is called.
    """

    backend_name: ClassVar[str] = "custom"
    config_key: ClassVar[str] = "server_args"  # the key of `config` that holds this backend's arguments
    engine: ClassVar[str | None] = None  # for the pytorch profiler's environment variable

    def __init__(self, model: str | Path | None = None, *, port: int = 8000, host: str = "127.0.0.1",
                 output_dir: str | Path = "./logs", heartbeat_interval: float = 10.0,
                 heartbeat_timeout: float = 60.0, startup_timeout: float = 600.0, stop_timeout: float = 30.0,
                 env_vars: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                 profile: Profile | Mapping[str, Any] | None = None, debug_mode: bool = False,
                 on_unhealthy: Callable[[InferenceServer], None] | None = None, name: str | None = None,
                 python: str | None = None) -> None:
        timings = {"heartbeat_interval": heartbeat_interval, "heartbeat_timeout": heartbeat_timeout,
                   "startup_timeout": startup_timeout}
        for key, value in timings.items():
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        unknown = sorted(set(config or {}) - {"api_server_args", "server_args"})
        if unknown:
            raise ConfigError(f"unknown key config.{unknown[0]}; known keys: api_server_args, server_args")
        self.model = None if model is None else str(model)
        self.port = int(port)
        self.host = host
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.env_vars = {str(k): str(v) for k, v in (env_vars or {}).items()}
        self.config = dict(config or {})
        self.profile = profile_from(profile)
        self.debug_mode = debug_mode
        self.on_unhealthy = on_unhealthy
        self.name = name or f"{self.get_backend_name()}-{self.port}"
        self.python = python
        self.server_id = uuid.uuid4().hex
        self.process: ChildProcess | None = None
        self.heartbeat: Heartbeat | None = None
        self.stop_report: StopReport | None = None

    # --- what a backend defines ----------------------------------------------------------------------
    def get_backend_name(self) -> str:
        return self.backend_name

    def get_binary_path(self) -> str:
        """The program (or Python interpreter) the launch command starts with."""
        return self.python or os.environ.get("PYTHON", "python3")

    def get_launch_command(self) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must define get_launch_command()")

    def get_health_endpoint(self) -> str:
        return "/health"

    def list_endpoints(self) -> list[str]:
        """URLs of what the server offers (the health endpoint first)."""
        return [self.url + path for path in (self.get_health_endpoint(), *OPENAI_PATHS)]

    def server_arguments(self) -> list[str]:
        """This backend's extra arguments from `config` (list, dict or mixed form)."""
        return server_args(self.config.get(self.config_key), f"config.{self.config_key}")

    def required_model(self) -> str:
        if self.model is None:
            raise ConfigError(f"model: required for the {self.get_backend_name()} backend")
        return self.model

    # --- where to reach it ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def log_path(self) -> Path:
        return self.output_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def healthy(self) -> bool:
        """The heartbeat's view: False before start, after stop, or after `heartbeat_timeout` of failures."""
        return self.heartbeat is not None and self.heartbeat.is_alive() and self.heartbeat.healthy

    def check_health(self) -> bool:
        """Probe the health endpoint now."""
        return http_ok(f"http://{probe_host(self.host)}:{self.port}{self.get_health_endpoint()}")

    # --- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> InferenceServer:
        """Start the process and wait for its health endpoint; a failure stops it and raises with its log."""
        if self.process is not None:
            raise RuntimeError("an InferenceServer starts once; create a new one")
        # the whole command first: a missing profiler or model fails before any process starts
        argv = self.profile.command_prefix(self.name) + self.get_launch_command()
        env = {**os.environ, **self.env_vars, **self.profile.environment(self.engine, self.name),
               SERVER_ID_ENV: self.server_id}
        health_url = f"http://{probe_host(self.host)}:{self.port}{self.get_health_endpoint()}"
        self.process = ChildProcess(self.name, argv, env, self.log_path, health_url)
        self.process.start()
        log.info("%s: pid %s, %s, log %s", self.name, self.pid, self.url, self.log_path)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.heartbeat = Heartbeat(self.process, self.heartbeat_interval, self.heartbeat_timeout,
                                   self._health_changed)
        self.heartbeat.record_processes()
        self.heartbeat.start()
        return self

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self.process.probe():
            code = self.process.exit_code()
            if code is not None:
                raise ServerStartError(f"{self.name} exited with code {code} during start-up; last lines of "
                                       f"{self.log_path}:\n{self.process.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"{self.name} did not pass {self.get_health_endpoint()} within "
                                       f"{self.startup_timeout:g} s (startup_timeout); last lines of "
                                       f"{self.log_path}:\n{self.process.log_tail()}")
            time.sleep(0.25)

    def _health_changed(self, healthy: bool) -> None:
        if not healthy and self.on_unhealthy is not None:
            self.on_unhealthy(self)

    def stop(self) -> StopReport:
        """Stop the process group and check by pid; with `debug_mode`, also scan the machine for orphans."""
        if self.stop_report is not None:
            return self.stop_report
        if self.process is None or self.process.pid is None:
            self.stop_report = StopReport(0, [], [], [])
            return self.stop_report
        pid = self.process.pid
        keys: set[ProcessKey] = snapshot([pid], [pid])
        if self.heartbeat is not None:
            self.heartbeat.stop()
            keys |= self.heartbeat.seen
        stop_groups([pid], keys, self.stop_timeout)
        late = snapshot([pid], [])  # helpers the server spawned while it shut down
        if late:
            keys |= late
            stop_groups([pid], late, min(self.stop_timeout, 5.0))
        self.process.stop(1.0)  # reaps the leader; the group is already gone
        left = [proc.pid for proc in alive(keys)]
        group_left = [proc.pid for proc in alive_members(pid)] if self.debug_mode else []
        orphans = self._orphans() if self.debug_mode else []
        self.stop_report = StopReport(len(keys), left, group_left, orphans)
        (log.info if self.stop_report.clean else log.warning)("%s stopped: %s", self.name,
                                                              self.stop_report.describe())
        return self.stop_report

    def _orphans(self) -> list[int]:
        """Processes anywhere on the machine that carry this server's id in their environment."""
        marker = self.server_id
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(SERVER_ID_ENV) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
            except psutil.Error:
                continue
        return found
