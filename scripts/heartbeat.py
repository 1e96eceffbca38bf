"""The single server's heartbeat: probe its health every interval and say when it has failed for too long.

A server is reported unhealthy only after its probes have failed for longer than `timeout` seconds (a busy
server may miss one probe), or at once when its process exits. Each probe also records every descendant the
server has at that moment, so that after stop a debug check can prove that none of them is left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from scripts.process_group import ProcessKey, snapshot
from scripts.supervisor import ChildProcess

log = logging.getLogger("scripts.heartbeat")


class Heartbeat(threading.Thread):
    """Probes one `ChildProcess` until `stop()`; `on_change(healthy)` is called on each transition."""

    def __init__(self, child: ChildProcess, interval: float, timeout: float,
                 on_change: Callable[[bool], None]) -> None:
        super().__init__(name=f"heartbeat-{child.name}", daemon=True)
        self.child = child
        self.interval = interval
        self.timeout = timeout
        self.on_change = on_change
        self.healthy = True  # started after the server passed its first health check
        self.last_ok = time.monotonic()
        self.seen: set[ProcessKey] = set()  # (pid, start time) of every process the server ever had
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=self.interval + 5)

    def record_processes(self) -> None:
        pid = self.child.pid
        if pid is not None:
            self.seen |= snapshot([pid], [pid])

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.beat()
            except Exception:  # the thread's outer edge: log and keep watching
                log.exception("heartbeat of %s failed", self.child.name)

    def beat(self) -> None:
        """One probe: update `healthy` (failing longer than `timeout`, or exited) and report a change."""
        self.record_processes()
        now = time.monotonic()
        exited = self.child.exit_code() is not None
        if not exited and self.child.probe():
            self.last_ok = now
        healthy = not exited and now - self.last_ok <= self.timeout
        if healthy != self.healthy:
            self.healthy = healthy
            if healthy:
                log.info("%s is healthy again", self.child.name)
            else:
                why = f"exited with code {self.child.exit_code()}" if exited else \
                    f"failed its health checks for {now - self.last_ok:.1f} s (> {self.timeout:g} s)"
                log.warning("%s is NOT healthy: %s (log: %s)", self.child.name, why, self.child.log_path)
            self.on_change(healthy)
