"""The running loop: round robin over running batches, one admission grant (bulk class) per line sent.

Each turn takes the next batch in rotation, takes its next line, waits for a bulk slot (admission grants it
only while no interactive request is queued, and never beyond --batch-max-inflight-per-worker on a worker),
then sends the line in a task of its own. One grant per turn means concurrent batches advance at the same
rate whatever their sizes. A ticker flushes results, persists progress and expires overdue batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from lb.backends import Backend
from lb.errors import BalancerError, NoHealthyBackend
from lb.jobs.run import BatchRun, Line
from lb.jobs.sender import Outcome, Sender

log = logging.getLogger("lb.jobs")
TICK = 0.25  # seconds between flushes of results and progress, and expiry checks
NO_WORKER_PAUSE = 0.5  # seconds to wait when no worker is routable at all


class Dispatcher:
    def __init__(
        self,
        sender: Sender,
        on_finished: Callable[[BatchRun], Awaitable[None]],
        on_progress: Callable[[BatchRun], None],
    ) -> None:
        self._sender = sender
        self._on_finished = on_finished
        self._on_progress = on_progress
        self.runs: dict[str, BatchRun] = {}
        self._order: deque[BatchRun] = deque()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._finishing: set[str] = set()
        self._closing = False  # shutting down: a cancelled line is not done, so no batch may finish now
        self.paused = False  # draining: no new lines; those in flight finish and are recorded

    def add(self, run: BatchRun) -> None:
        self.runs[run.batch_id] = run
        self._order.append(run)
        self._wake.set()
        self._maybe_finish(run)  # resumed with every line already done

    def pause(self) -> None:
        """Send no more lines (the balancer is draining); lines in flight finish and keep their results."""
        self.paused = True

    def stop(self, batch_id: str, reason: str) -> None:
        """Take no more lines of the batch (`cancelled` or `expired`); in-flight lines finish."""
        run = self.runs.get(batch_id)
        if run is not None and run.stopping is None:
            run.stopping = reason
            self._maybe_finish(run)

    async def run(self) -> None:
        """The dispatch loop and the ticker, until cancelled; then in-flight lines are cancelled unrecorded
        (they are sent again after a restart) and buffered results are written."""
        ticker = asyncio.create_task(self._tick(), name="lb-batches-tick")
        try:
            await self._loop()
        finally:
            self._closing = True
            ticker.cancel()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(ticker, *self._tasks, return_exceptions=True)
            for run in self.runs.values():
                run.close()
                self._on_progress(run)

    async def _loop(self) -> None:
        while True:
            run = self._next()
            if run is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            line = run.take()
            if line is None:
                self._maybe_finish(run)
                continue
            try:
                backend = await self._sender.acquire(line.model, frozenset(), bulk=True, patient=True)
            except NoHealthyBackend:
                run.give_back(line)
                await asyncio.sleep(NO_WORKER_PAUSE)
                continue
            except BalancerError as exc:  # the line's model is no longer served by any worker
                run.record(
                    line, Outcome(exc.status, {"error": {"message": exc.message, "code": exc.code}}, 0)
                )
                continue
            if run.stopping is not None or self.paused:  # stopped while this line waited for its slot
                self._sender.release(backend, True)
                run.give_back(line)
                continue
            run.in_flight += 1
            task = asyncio.create_task(self._send(run, line, backend))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _next(self) -> BatchRun | None:
        """The next batch in rotation that has lines to send."""
        if self.paused:
            return None
        for _ in range(len(self._order)):
            run = self._order[0]
            self._order.rotate(-1)
            if run.wants_lines:
                return run
        return None

    async def _send(self, run: BatchRun, line: Line, backend: Backend) -> None:
        try:
            try:
                outcome = await self._sender.send(
                    run.endpoint, line.body, bulk=True, patient=True, first=backend
                )
            except BalancerError as exc:
                outcome = Outcome(exc.status, {"error": {"message": exc.message, "code": exc.code}}, 0)
            except Exception as exc:  # a task's outer edge: the line still gets exactly one result
                log.exception("batch %s line %s failed inside the balancer", run.batch_id, line.custom_id)
                outcome = Outcome(None, {"code": "internal_error", "message": repr(exc)}, 0)
            run.record(line, outcome)
        finally:
            run.in_flight -= 1
            self._maybe_finish(run)

    def _maybe_finish(self, run: BatchRun) -> None:
        if (
            self._closing
            or run.in_flight
            or not (run.exhausted or run.stopping)
            or run.batch_id in self._finishing
        ):
            return
        self._finishing.add(run.batch_id)
        task = asyncio.create_task(self._finish(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, run: BatchRun) -> None:
        try:
            if run.stopping == "expired":
                for line in run.remaining():
                    run.expire(line)
            run.close()
            await self._on_finished(run)
        except Exception:  # a task's outer edge: log, the batch stays unfinished and resumes on restart
            log.exception("finishing batch %s failed", run.batch_id)
        finally:
            self.runs.pop(run.batch_id, None)
            if run in self._order:
                self._order.remove(run)
            self._finishing.discard(run.batch_id)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.time()
            for run in list(self.runs.values()):
                if run.stopping is None and now >= run.expires_at:
                    log.info("batch %s reached its completion window: expiring unsent lines", run.batch_id)
                    self.stop(run.batch_id, "expired")
                run.flush()
                self._on_progress(run)
