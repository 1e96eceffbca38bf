"""The auto-scaling hook (--scale-command): ask for one worker more or fewer when the queue says so.

Every tick the autoscaler reads the admission queue (interactive and bulk waiters). When it stays at or above
--scale-up-queue for --scale-window seconds it runs `COMMAND N` with N = healthy workers + 1; when it stays at
or below --scale-down-queue for as long, and the remaining workers could carry what is in flight (under
--max-inflight-per-worker, if set), it runs `COMMAND N` with one fewer. N is bounded by --scale-min and
--scale-max, and after a decision nothing happens for --scale-cooldown seconds. N is the absolute count the
command should bring the cluster to, so asking twice is harmless; the command starts or stops workers and
registers them (POST /workers) or lets --discover find them. Every decision is logged and counted in /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from collections.abc import Callable

from lb.backends import BackendPool
from lb.metrics import Metrics

log = logging.getLogger("lb.autoscale")
COMMAND_TIMEOUT = 300.0  # seconds a scale command may run before it is killed and counted as failed


class Autoscaler:
    def __init__(
        self,
        command: str,
        pool: BackendPool,
        queue_depth: Callable[[], int],
        metrics: Metrics,
        *,
        minimum: int,
        maximum: int,
        up_queue: int,
        down_queue: int,
        window: float,
        cooldown: float,
        cap: int | None,
    ) -> None:
        self._argv = shlex.split(command)
        self._pool = pool
        self._queue_depth = queue_depth
        self._metrics = metrics
        self.minimum, self.maximum = minimum, maximum
        self._up_queue, self._down_queue = up_queue, down_queue
        self._window, self._cooldown = window, cooldown
        self._cap = cap
        self.tick = min(1.0, window / 4)  # seconds between looks at the queue
        self._up_since: float | None = None
        self._down_since: float | None = None
        self._last_decision = -float("inf")

    async def run(self) -> None:
        while True:
            decision = self.observe(time.monotonic())
            if decision is not None:
                await self.call(*decision)
            await asyncio.sleep(self.tick)

    def workers(self) -> int:
        return sum(1 for b in self._pool.backends if b.healthy and not b.draining)

    def observe(self, now: float) -> tuple[int, int, str] | None:
        """(current, desired, direction) when a threshold has held for the window, outside the cool-down."""
        depth = self._queue_depth()
        current = self.workers()
        if depth >= self._up_queue:
            self._up_since = self._up_since if self._up_since is not None else now
            self._down_since = None
        elif depth <= self._down_queue and self._spare(current):
            self._down_since = self._down_since if self._down_since is not None else now
            self._up_since = None
        else:
            self._up_since = self._down_since = None
        if now - self._last_decision < self._cooldown:
            return None
        if self._up_since is not None and now - self._up_since >= self._window and current < self.maximum:
            return self._decide(now, current, min(self.maximum, current + 1), "up")
        if self._down_since is not None and now - self._down_since >= self._window and current > self.minimum:
            return self._decide(now, current, max(self.minimum, current - 1), "down")
        return None

    def _spare(self, current: int) -> bool:
        """Whether one worker fewer could still hold every request in flight (always, without a cap)."""
        return self._cap is None or self._pool.total_in_flight <= (current - 1) * self._cap

    def _decide(self, now: float, current: int, desired: int, direction: str) -> tuple[int, int, str]:
        self._last_decision = now
        self._up_since = self._down_since = None
        return current, desired, direction

    async def call(self, current: int, desired: int, direction: str) -> bool:
        """Run the command with the desired worker count; log and count the outcome."""
        argv = [*self._argv, str(desired)]
        log.warning(
            "scaling %s: %d -> %d workers (queue %d): %s",
            direction,
            current,
            desired,
            self._queue_depth(),
            shlex.join(argv),
        )
        env = {**os.environ, "IB_LB_SCALE_CURRENT": str(current), "IB_LB_SCALE_DIRECTION": direction}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        except OSError as exc:
            log.error("scale command could not start: %s", exc)
            self._metrics.scaled(direction, "failed")
            return False
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                output, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("scale command ran past %gs and was killed", COMMAND_TIMEOUT)
            self._metrics.scaled(direction, "failed")
            return False
        except asyncio.CancelledError:
            proc.kill()  # the balancer is stopping: no half-run command left behind
            raise
        ok = proc.returncode == 0
        tail = output.decode(errors="replace").strip()[-500:]
        if ok:
            log.info("scale command done%s", f": {tail}" if tail else "")
        else:
            log.error("scale command exited %s: %s", proc.returncode, tail or "(no output)")
        self._metrics.scaled(direction, "ok" if ok else "failed")
        return ok
