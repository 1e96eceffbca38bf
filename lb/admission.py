"""Admission: two priority classes, interactive before bulk, each with its FIFO queue of waiters.

Interactive requests: with --max-inflight-per-worker, a request that finds no backend under the cap (or
finds others already waiting) joins the interactive queue; without a cap it never waits. Bulk requests
(batch lines, and interactive requests marked with the `X-LB-Priority: bulk` header) are granted a slot only
while no interactive request is queued (an interactive request that has to wait stops all bulk dispatch
until it is served), and never beyond a per-backend bulk limit: --batch-max-inflight-per-worker
(`bulk_cap`), by default twice the worker's batch size (its batch full and as many waiting to join it, so
the worker admits them in groups). While interactive requests are arriving (one in the last
INTERACTIVE_RECENT seconds) the limit drops to the worker's batch size minus one: a slot of the running
batch stays free, so an interactive request joins at once instead of queueing behind batch lines.

Each release hands the freed slot to the oldest waiter that can use it, interactive waiters first. A grant
*reserves* the slot (`backend.reserved`, and `backend.bulk_reserved` for bulk) until the waiter resumes and
enters `pool.track`, so a newcomer cannot steal it in between, and a waiter cancelled after its grant gives
the reservation back.
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
PRIORITY_HEADER = b"x-lb-priority"  # `X-LB-Priority: bulk` puts an interactive request in the bulk class
WORKER_BATCH_SIZE = 8  # a worker's batch size when its /health does not say (the workers' default)
INTERACTIVE_RECENT = 2.0  # seconds: interactive traffic this recent keeps one slot per running batch free


def is_bulk(raw_headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the client asked for the bulk class (`X-LB-Priority: bulk`, case-insensitive)."""
    for name, value in raw_headers:
        if len(name) == 13 and name.lower() == PRIORITY_HEADER:
            return value.strip().lower() == b"bulk"
    return False


class _Waiter:
    __slots__ = ("bulk", "candidates", "exclude", "future", "patient", "work")

    def __init__(
        self,
        candidates: Candidates,
        exclude: frozenset[int],
        future: asyncio.Future[Backend],
        bulk: bool,
        patient: bool = False,
        work: Work = PLAIN,
    ) -> None:
        self.candidates = candidates
        self.exclude = exclude
        self.future = future
        self.bulk = bulk
        self.patient = patient  # the balancer's own batch line: not failed at shutdown (it resumes later)
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
        bulk_cap: int | None = None,
    ) -> None:
        self._pool = pool
        self._policy = policy
        self.cap = max_inflight_per_worker
        self.bulk_cap = bulk_cap
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._queue: deque[_Waiter] = deque()  # interactive waiters
        self._bulk_queue: deque[_Waiter] = deque()
        self.on_wait = on_wait  # receives each queued interactive request's wait in seconds (metrics)
        self._last_interactive = -INTERACTIVE_RECENT  # monotonic seconds
        pool.on_release(lambda _backend: self._dispatch())
        pool.on_change(self._dispatch)

    @property
    def depth(self) -> int:
        """Interactive requests waiting for a slot."""
        return len(self._queue)

    @property
    def bulk_depth(self) -> int:
        return len(self._bulk_queue)

    def _available(self, candidates: Sequence[Backend], exclude: frozenset[int], bulk: bool) -> list[Backend]:
        cap = self.cap
        busy = bulk and time.monotonic() - self._last_interactive < INTERACTIVE_RECENT
        return [
            b
            for b in candidates
            if b.index not in exclude
            and (cap is None or b.in_flight + b.reserved < cap)
            and (not bulk or b.bulk_in_flight + b.bulk_reserved < self.bulk_limit(b, busy))
        ]

    def bulk_limit(self, backend: Backend, interactive_recent: bool) -> int:
        """Bulk requests `backend` may hold now (see the module docstring)."""
        size = backend.batch_size or WORKER_BATCH_SIZE
        limit = self.bulk_cap if self.bulk_cap is not None else 2 * size
        if interactive_recent:
            limit = min(limit, max(1, size - 1))
        return limit

    async def choose(
        self,
        candidates: Candidates,
        exclude: frozenset[int] = frozenset(),
        *,
        bulk: bool = False,
        patient: bool = False,
        work: Work = PLAIN,
    ) -> Backend:
        """A routable backend for one attempt; the caller enters `pool.track(backend, bulk=bulk)` without
        awaiting first.

        Raises NoHealthyBackend when no candidate is routable (WorkersBusy when all are resting after a
        Retry-After), QueueFull when the queue is full or the wait times out. `patient` (the balancer's own
        batch lines) waits without a queue limit or timeout.
        """
        current = candidates()
        if exclude:
            current = [b for b in current if b.index not in exclude]
        if not current and not self._resting(exclude):
            raise self._pool.unavailable()
        if not bulk:
            self._last_interactive = time.monotonic()
            if self.cap is None and current:
                return self._policy.choose(current, work)
        queue = self._bulk_queue if bulk else self._queue
        if not queue and not (bulk and self._queue):
            free = self._available(current, exclude, bulk)
            if free:
                return self._policy.choose(free, work)
        if not patient and len(queue) >= self.max_queue:
            raise QueueFull(
                f"All workers are busy and {self.max_queue} requests are already queued; retry later."
            )
        return await self._wait(candidates, exclude, bulk, None if patient else self.queue_timeout, work)

    async def _wait(
        self,
        candidates: Candidates,
        exclude: frozenset[int],
        bulk: bool,
        timeout: float | None,  # noqa: ASYNC109 - None: a patient waiter, no deadline
        work: Work = PLAIN,
    ) -> Backend:
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(candidates, exclude, future, bulk, patient=timeout is None, work=work)
        queue = self._bulk_queue if bulk else self._queue
        queue.append(waiter)
        started = time.perf_counter()
        self._dispatch()  # other waiters' models may leave capacity this one can use right away
        try:
            async with asyncio.timeout(timeout):
                backend = await future
        except BaseException as exc:
            if waiter in queue:
                queue.remove(waiter)
            if future.done() and not future.cancelled() and future.exception() is None:
                self._unreserve(future.result(), bulk)  # granted, then cancelled before use: hand it on
                self._dispatch()
            if isinstance(exc, TimeoutError):
                raise QueueFull(
                    f"All workers stayed busy for the {self.queue_timeout:g}s this request waited."
                ) from None
            raise
        finally:
            if self.on_wait is not None and not bulk:
                self.on_wait(time.perf_counter() - started)
        self._unreserve(backend, bulk)  # the caller now enters pool.track(backend) in this same loop step
        return backend

    @staticmethod
    def _unreserve(backend: Backend, bulk: bool) -> None:
        backend.reserved -= 1
        if bulk:
            backend.bulk_reserved -= 1

    def _dispatch(self) -> None:
        """Hand free slots to waiters in FIFO order, interactive first; bulk only once none is waiting."""
        if self._queue:
            self._grant(self._queue)
        if self._bulk_queue and not self._queue:
            self._grant(self._bulk_queue)

    def _grant(self, queue: deque[_Waiter]) -> None:
        """A waiter whose candidates have no free slot keeps its place."""
        for waiter in list(queue):
            if waiter.future.done():
                continue
            candidates = waiter.candidates()
            if not candidates and not self._resting(waiter.exclude):
                waiter.future.set_exception(self._pool.unavailable())
                queue.remove(waiter)
                continue
            free = self._available(candidates, waiter.exclude, waiter.bulk)
            if free:
                backend = self._policy.choose(free, waiter.work)
                backend.reserved += 1
                if waiter.bulk:
                    backend.bulk_reserved += 1
                queue.remove(waiter)
                waiter.future.set_result(backend)

    def _resting(self, exclude: frozenset[int]) -> bool:
        """Whether a worker this request may use is only resting after a 429/503 + Retry-After that ends
        within the queue timeout: then the request waits in the queue for it rather than failing at once."""
        wait = self._pool.busy_for(exclude)
        return wait is not None and wait <= self.queue_timeout

    def fail_all(self, exc: Exception) -> int:
        """Shutdown: every client's waiter, interactive and bulk, gets `exc` (a 503 at once rather than a
        cut connection at the drain deadline). Patient waiters (batch lines) stay: a line failed now would
        be recorded as failed, while one cancelled with the dispatcher is resumed on restart. Returns how
        many were failed."""
        failed = 0
        for queue in (self._queue, self._bulk_queue):
            for waiter in [w for w in queue if not w.patient]:
                queue.remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
                    failed += 1
        return failed
