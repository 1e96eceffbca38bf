"""Child processes (workers, the balancer) in their own process groups, and the thread that watches them.

The supervisor is the launcher's heartbeat: every interval it probes each child's health URL, reports
transitions (healthy → unhealthy → healthy), and restarts a child that exited with exponential backoff
(1, 2, 4 ... s up to a cap; reset once the child stayed healthy for `STABLE_AFTER_S`). Exits are polled
every `EXIT_POLL_S`, faster than health probes, so a crash is noticed at once. The balancer notices a
restarted worker by itself: its URL is unchanged, so its own health checks re-add it.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from scripts.process_group import signal_group, snapshot, stop_groups

log = logging.getLogger("scripts.supervisor")
STABLE_AFTER_S = 30.0  # a child healthy this long has its restart backoff reset
PROBE_TIMEOUT_S = 2.0
EXIT_POLL_S = 0.25  # exits are noticed (and due restarts made) this often; probes run every `interval`


def http_ok(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ChildProcess:
    """One supervised server: argv, env and log file are fixed, so a restart is the same server again."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, health_url: str,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.health_url = health_url
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.create_time: float | None = None
        self.starts = 0
        self.healthy = False
        self.last_check: float | None = None
        self.healthy_since: float | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def start(self) -> None:
        """Start (or restart) in a new session: own process group, so Ctrl-C on the launcher's terminal
        reaches only the launcher, which then stops children in order."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"\n=== {stamp} start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
            log_file.flush()
            self.popen = subprocess.Popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                          start_new_session=True)
        self.starts += 1
        self.healthy = False
        self.healthy_since = None
        try:
            self.create_time = psutil.Process(self.popen.pid).create_time()
        except psutil.Error:
            self.create_time = None

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def probe(self) -> bool:
        self.healthy = http_ok(self.health_url)
        self.last_check = time.time()
        if self.healthy and self.healthy_since is None:
            self.healthy_since = time.monotonic()
        elif not self.healthy:
            self.healthy_since = None
        return self.healthy

    def stop(self, timeout: float) -> list[psutil.Process]:
        """SIGTERM the group, SIGKILL after `timeout`; returns processes that survived even that."""
        if self.popen is None:
            return []
        keys = snapshot([self.popen.pid], [self.popen.pid])
        left = stop_groups([self.popen.pid], keys, timeout)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            signal_group(self.popen.pid, signal.SIGKILL)
        return left

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class RestartPolicy:
    enabled: bool = True
    max_restarts: int = 10
    backoff_max_s: float = 30.0


class Supervisor(threading.Thread):
    """Heartbeat and restarts for a fixed set of children, until `stop()`."""

    def __init__(self, children: list[ChildProcess], interval: float, policy: RestartPolicy,
                 report: Callable[[str], None], on_restart: Callable[[ChildProcess], None],
                 run_file: Path | None = None) -> None:
        super().__init__(name="cluster-supervisor", daemon=True)
        self.children = children
        self.interval = interval
        self.policy = policy
        self.report = report
        self.on_restart = on_restart
        self.run_file = run_file
        self.stopped_from_outside = threading.Event()
        self._stop_event = threading.Event()
        self._restart_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=EXIT_POLL_S + 2 * PROBE_TIMEOUT_S * (len(self.children) + 1))

    def run(self) -> None:
        next_probe = 0.0
        while not self._stop_event.is_set():
            now = time.monotonic()
            probe = now >= next_probe
            if probe:
                next_probe = now + self.interval
            try:
                self._tick(probe)
            except Exception:  # the thread's outer edge: log and keep watching
                log.exception("supervisor tick failed")
            self._stop_event.wait(EXIT_POLL_S)

    def _tick(self, probe: bool) -> None:
        """Exits and due restarts every EXIT_POLL_S; health probes only when `probe` (every interval)."""
        outside = self.run_file is not None and not self.run_file.exists()
        if outside and not self.stopped_from_outside.is_set():
            self.report(f"{self.run_file} was removed (scripts/stop.sh): no more restarts")
            self.stopped_from_outside.set()
        for child in self.children:
            if self._stop_event.is_set():
                return
            code = child.exit_code()
            if code is not None:
                self._handle_exit(child, code)
                continue
            if not probe:
                continue
            was_healthy = child.healthy
            if child.probe() != was_healthy:
                self.report(f"{child.name} is {'healthy' if child.healthy else 'NOT healthy'} "
                            f"(pid {child.pid}, {child.health_url})")
            if child.healthy_since is not None and time.monotonic() - child.healthy_since > STABLE_AFTER_S:
                self._backoff.pop(child.name, None)

    def _handle_exit(self, child: ChildProcess, code: int) -> None:
        if self.stopped_from_outside.is_set() or not self.policy.enabled:
            if child.healthy or child.name not in self._restart_at:
                self.report(f"{child.name} exited with code {code}; not restarting")
                self._restart_at[child.name] = float("inf")
            child.healthy = False
            return
        now = time.monotonic()
        due = self._restart_at.get(child.name)
        if due is None:
            if child.restarts >= self.policy.max_restarts:
                self.report(f"{child.name} exited with code {code}; gave up after {child.restarts} restarts "
                            f"(log: {child.log_path})")
                self._restart_at[child.name] = float("inf")
                child.healthy = False
                return
            delay = self._backoff.get(child.name, 1.0)
            self._backoff[child.name] = min(delay * 2, self.policy.backoff_max_s)
            self._restart_at[child.name] = now + delay
            child.healthy = False
            self.report(f"{child.name} exited with code {code}; restarting in {delay:.0f} s "
                        f"(log: {child.log_path})")
        elif now >= due:
            del self._restart_at[child.name]
            child.start()
            self.report(f"{child.name} restarted (pid {child.pid}, restart #{child.restarts})")
            self.on_restart(child)
