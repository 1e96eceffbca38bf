"""Admission: with --max-inflight-per-worker, requests beyond every cap wait in a bounded FIFO queue.

Without a cap, `choose` never awaits: the policy picks among the candidates at once. With a cap, a request
that finds no backend under it (or finds others already waiting) joins the queue; each release hands the
freed slot to the oldest waiter that can use it. A grant *reserves* the slot (`backend.reserved`) until the
waiter resumes and enters `pool.track`, so a newcomer cannot steal it in between, and a waiter cancelled
after its grant gives the reservation back.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence

from lb.backends import Backend, BackendPool
from lb.errors import QueueFull
from lb.policies import Policy
from lb.work import PLAIN, Work

Candidates = Callable[[], Sequence[Backend]]  # re-evaluated at each grant: health can change while waiting


class _Waiter:
    __slots__ = ("candidates", "exclude", "future", "work")

    def __init__(
        self, candidates: Candidates, exclude: frozenset[int], future: asyncio.Future[Backend], work: Work
    ) -> None:
        self.candidates = candidates
        self.exclude = exclude
        self.future = future
        self.work = work  # what the policy may read of the request when it picks for this waiter


class Admission:
    def __init__(
        self,
        pool: BackendPool,
        policy: Policy,
        max_inflight_per_worker: int | None,
        max_queue: int,
        queue_timeout: float,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self.cap = max_inflight_per_worker
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._queue: deque[_Waiter] = deque()
        self.on_wait = on_wait  # receives each queued request's wait in seconds (metrics)
        if self.cap is not None:
            pool.on_release(lambda _backend: self._dispatch())
            pool.on_change(self._dispatch)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def _available(self, candidates: Sequence[Backend], exclude: frozenset[int]) -> list[Backend]:
        cap = self.cap
        assert cap is not None
        return [b for b in candidates if b.in_flight + b.reserved < cap and b.index not in exclude]

    async def choose(
        self, candidates: Candidates, exclude: frozenset[int] = frozenset(), work: Work = PLAIN
    ) -> Backend:
        """A routable backend for one attempt; the caller enters `pool.track(backend)` without awaiting first.

        Raises NoHealthyBackend when no candidate is routable (WorkersBusy when all are resting after a
        Retry-After), QueueFull when the queue is full or the wait times out.
        """
        current = candidates()
        if exclude:
            current = [b for b in current if b.index not in exclude]
        if not current:
            raise self._pool.unavailable()
        if self.cap is None:
            return self._policy.choose(current, work)
        if not self._queue:
            free = self._available(current, exclude)
            if free:
                return self._policy.choose(free, work)
        if len(self._queue) >= self.max_queue:
            raise QueueFull(
                f"All workers are busy and {self.max_queue} requests are already queued; retry later."
            )
        return await self._wait(candidates, exclude, work)

    async def _wait(self, candidates: Candidates, exclude: frozenset[int], work: Work) -> Backend:
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(candidates, exclude, future, work)
        self._queue.append(waiter)
        started = time.perf_counter()
        self._dispatch()  # other waiters' models may leave capacity this one can use right away
        try:
            async with asyncio.timeout(self.queue_timeout):
                backend = await future
        except BaseException as exc:
            if waiter in self._queue:
                self._queue.remove(waiter)
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().reserved -= 1  # granted, then cancelled before use: hand the slot on
                self._dispatch()
            if isinstance(exc, TimeoutError):
                raise QueueFull(
                    f"All workers stayed busy for the {self.queue_timeout:g}s this request waited."
                ) from None
            raise
        finally:
            if self.on_wait is not None:
                self.on_wait(time.perf_counter() - started)
        backend.reserved -= 1  # the caller now enters pool.track(backend) in this same loop step
        return backend

    def _dispatch(self) -> None:
        """Hand free slots to waiters in FIFO order; a waiter whose candidates have none keeps its place."""
        if not self._queue:
            return
        for waiter in list(self._queue):
            if waiter.future.done():
                continue
            candidates = waiter.candidates()
            if not candidates:
                waiter.future.set_exception(self._pool.unavailable())
                self._queue.remove(waiter)
                continue
            free = self._available(candidates, waiter.exclude)
            if free:
                backend = self._policy.choose(free, waiter.work)
                backend.reserved += 1
                self._queue.remove(waiter)
                waiter.future.set_result(backend)

    def fail_all(self, exc: Exception) -> None:
        """Shutdown: every waiter gets `exc`."""
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)
