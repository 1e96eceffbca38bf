"""The dynamic batcher: a bounded queue in front of ONE engine thread, which it drives step by step.

Shape (Ray Serve's batching for the queue, nano-vllm's `LLMEngine.step` for the loop): requests wait in a
queue until `batch_size` are there or `max_wait_time` has passed since the oldest arrived; then the engine
thread loops: admit (a fresh batch into an idle engine, or queued requests into the free slots beside the
running rows: continuous batching), retire cancelled rows (`Engine.abort`), advance one `Engine.step`, and
hand that step's events to the event loop with one `call_soon_threadsafe`, which puts each event on its
submission's asyncio queue; finished rows leave. Admission, cancellation and delivery live here once, for
every engine. A cancelled request leaves the queue at once, or the engine before its next step. A step that
runs out of memory splits the batch: the newest rows are set aside (`Engine.suspend`, nothing they generated
is lost) and the cap on rows per step is lowered for a while (batch_cap.py); the rest step again at once.
Any other engine exception is fanned out to every request it affected; the worker keeps serving.

Threads: the event loop (submit, cancel, delivery), one "prepare" thread (tokenising, so a long prompt never
blocks the loop nor waits behind a batch) and one "engine" thread (load, then step). Shared state (the
queue, running and cancelled sets) is guarded by one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from workers.batch_cap import BatchCap
from workers.engines.base import Engine, EngineRequest, PromptTooLongError, TokenEvent, is_out_of_memory
from workers.errors import EngineFailed, NotReady, QueueFull
from workers.metrics import WorkerMetrics
from workers.submission import Submission

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    request: EngineRequest
    submission: Submission
    enqueued_at: float  # time.monotonic()


class DynamicBatcher:
    """Owns the engine thread. `start()` loads the engine; `submit()` queues requests; `close()` stops."""

    def __init__(
        self, engine: Engine, *, batch_size: int, max_wait_time: float, max_queue: int,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.cap = BatchCap(batch_size)  # lowered while steps run out of memory
        self.max_wait_time = max_wait_time  # seconds
        self.max_queue = max_queue
        self.metrics = metrics
        self.accepting = True
        self.failure: str | None = None  # set if the engine thread died; /health then reports "failed"
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[_Entry] = deque()
        self._running: dict[str, Submission] = {}  # request id -> its submission, while in the engine
        self._active: dict[str, _Entry] = {}  # what the engine holds; changed on the engine thread only
        self._suspended: deque[str] = deque()  # held by the engine, set aside (out of memory); resumed first
        self._cancelled: set[str] = set()
        self._preparing = 0  # requests between admission and the queue (tokenising); loop thread only
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")

    # ---- state read by /health and /metrics -------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue) + self._preparing

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def is_idle(self) -> bool:
        return not self._queue and not self._running and not self._preparing

    # ---- lifecycle (event loop) --------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread and load the engine on it; returns when loaded, raises if loading fails."""
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._engine_main, args=(loaded,), name="engine", daemon=True)
        self._thread.start()
        await loaded

    async def wait_idle(self, limit: float) -> bool:
        """Wait up to `limit` seconds until nothing is queued or running; False if time ran out first."""
        deadline = time.monotonic() + limit
        while not self.is_idle:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self, join_limit: float = 10.0) -> None:
        """Stop accepting, fail the queued, cut the running off at their next step, join the thread."""
        self.accepting = False
        if self._stopping:
            return  # already closed (the drain and the app's cleanup both call this)
        for submission in self._drop_all():
            submission.put(NotReady("the worker is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, join_limit)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # ---- requests (event loop) ---------------------------------------------------------------------
    @asynccontextmanager
    async def submit(
        self, requests: list[EngineRequest], *, fill_context: bool = False, arrived_at: float | None = None,
    ) -> AsyncIterator[Submission]:
        """Prepare and queue `requests` (429 if full, 400 if too long); leaving the block cancels the rest.

        `fill_context`: each request may generate up to the rest of the context after its prompt.
        """
        submission = await self._enqueue(requests, fill_context, arrived_at or time.monotonic())
        try:
            yield submission
        finally:
            self.cancel(submission)

    async def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The engine's chat template, applied on the prepare thread (templates can be slow)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_pool, self.engine.render_chat, messages)

    def cancel(self, submission: Submission) -> None:
        """Drop the submission's unfinished requests from the queue or the running batch (no-op when done)."""
        if not submission.unfinished:
            return
        with self._lock:
            self._queue = deque(e for e in self._queue if e.submission is not submission)
            for request_id in submission.unfinished:
                if request_id in self._running:
                    del self._running[request_id]  # its slot is free now; the engine drops it next step
                    self._cancelled.add(request_id)
        submission.unfinished.clear()

    async def _enqueue(
        self, requests: list[EngineRequest], fill_context: bool, arrived_at: float
    ) -> Submission:
        if not self.accepting:
            raise NotReady("the worker is draining and accepts no new requests")
        if self.queue_depth + len(requests) > self.max_queue:
            raise QueueFull(f"the worker's queue is full ({self.max_queue} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        self._preparing += len(requests)
        try:
            await loop.run_in_executor(self._prepare_pool, self._prepare_all, requests, fill_context)
        finally:
            self._preparing -= len(requests)
        if self.metrics is not None:
            self.metrics.observe_prompt(sum(len(r.prompt_token_ids) for r in requests))
        submission = Submission(requests, arrived_at)
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                raise NotReady("the worker is shutting down")
            self._queue.extend(_Entry(r, submission, now) for r in requests)
            self._wakeup.notify()
        return submission

    def _prepare_all(self, requests: list[EngineRequest], fill_context: bool) -> None:
        """Tokenise on the prepare thread; n copies of one prompt are tokenised once."""
        limit = self.engine.info.max_model_len
        previous: EngineRequest | None = None
        for request in requests:
            if previous is not None and previous.prompt == request.prompt:
                request.prompt_token_ids = list(previous.prompt_token_ids)
            else:
                self.engine.prepare(request)
            prompt_len = len(request.prompt_token_ids)
            if fill_context:
                request.params = replace(request.params, max_new_tokens=limit - prompt_len)
            if request.params.max_new_tokens < 1 or prompt_len + request.params.max_new_tokens > limit:
                raise PromptTooLongError(
                    f"this model's maximum context length is {limit} tokens, but {prompt_len} prompt "
                    f"tokens + {max(request.params.max_new_tokens, 1)} new tokens were requested"
                )
            previous = request

    # ---- engine thread -----------------------------------------------------------------------------
    def _engine_main(self, loaded: asyncio.Future[None]) -> None:
        try:
            self.engine.load()
        except BaseException as exc:  # the thread's outer edge: report to start() and end the thread
            self._call_soon(self._settle, loaded, exc)
            return
        self._call_soon(self._settle, loaded, None)
        try:
            while self._admit():
                self._step()
        except BaseException as exc:  # a bug of ours, not the engine's: stop serving loudly, never hang
            log.exception("the engine thread died")
            self.failure = f"engine thread died: {type(exc).__name__}: {exc}"
            self.accepting = False
            for submission in self._drop_all():
                self._call_soon(submission.put, EngineFailed(self.failure))

    def _drop_all(self) -> list[Submission]:
        """Stop the engine loop; empty the queue and the running set; return their submissions, once each."""
        with self._lock:
            self._stopping = True
            dropped = [e.submission for e in self._queue] + list(self._running.values())
            self._queue.clear()
            self._cancelled.update(self._running)
            self._running.clear()
            self._wakeup.notify_all()
        return list({id(s): s for s in dropped}.values())

    def _admit(self) -> bool:
        """Hand queued requests to the engine: a fresh batch when it is idle (after waiting for one to fill),
        else as many as fit beside the running rows, without waiting. False once the batcher is stopping."""
        resumed: list[str] = []
        with self._wakeup:
            cap = self.cap.current()
            if self._active:
                room = cap - self._stepping
                if self._stepping:  # an engine with nothing to step takes what the cap allows, as fresh
                    room = min(room, self.engine.free_slots())
                resumed = [self._suspended.popleft() for _ in range(min(max(room, 0), len(self._suspended)))]
                room = min(room - len(resumed), len(self._queue))
                entries = [self._queue.popleft() for _ in range(max(room, 0))]
            else:
                entries = self._wait_for_batch(cap)
            if self._stopping:
                return False
            self._running.update((e.request.request_id, e.submission) for e in entries)
        if resumed:
            self.engine.add([self._active[rid].request for rid in resumed])
        if entries:
            if self.metrics is not None:
                if self._active:
                    self.metrics.observe_admitted(len(entries))
                else:
                    self.metrics.observe_batch(len(entries))
            self._active.update((e.request.request_id, e) for e in entries)
            self.engine.add([e.request for e in entries])
        return True

    @property
    def _stepping(self) -> int:
        """Rows the engine advances at its next step (held and not set aside)."""
        return len(self._active) - len(self._suspended)

    def _wait_for_batch(self, cap: int) -> list[_Entry]:
        """Under the lock: block until a batch is due (cap requests queued, or the oldest waited
        max_wait_time) and take it; empty when stopping."""
        while not self._queue and not self._stopping:
            self._wakeup.wait()
        if self._stopping:
            return []
        deadline = self._queue[0].enqueued_at + self.max_wait_time
        while len(self._queue) < cap and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.wait(remaining)
        return [self._queue.popleft() for _ in range(min(cap, len(self._queue)))]

    def _step(self) -> None:
        """Retire cancelled rows, advance the engine one step, deliver its events."""
        with self._lock:
            gone = [rid for rid in self._active if rid in self._cancelled]
            self._cancelled.difference_update(gone)
        if gone:
            self.engine.abort(gone)
            for request_id in gone:
                del self._active[request_id]
                if request_id in self._suspended:
                    self._suspended.remove(request_id)
        if not self._active:
            return
        stepping = self._stepping
        try:
            events = self.engine.step()
        except Exception as exc:
            if is_out_of_memory(exc) and stepping > 1:
                self._split(stepping, exc)
                return  # the next iteration steps the rows that are left, and admits by the lower cap
            # one engine failure fails exactly the requests it was generating
            log.exception("engine failed in a step of %d requests", stepping)
            failure = EngineFailed(f"the engine failed: {type(exc).__name__}: {exc}")
            failed = {rid: e for rid, e in self._active.items() if rid not in self._suspended}
            self._fail(self._live(failed), failure)
            self._retire(list(failed))
            return
        self._dispatch(events)

    def _split(self, rows: int, exc: BaseException) -> None:
        """A step of `rows` rows ran out of memory: lower the cap to half of them and set the newest rows
        aside (the engine keeps what they generated); they resume, first in line, as rows finish."""
        cap = self.cap.lower(rows)
        stepping = [rid for rid in self._active if rid not in self._suspended]  # admission order
        aside = stepping[cap:]
        self.engine.suspend(aside)
        self._suspended.extendleft(reversed(aside))
        log.warning("out of memory in a step of %d rows (%s): batch cap lowered to %d of %d, %d rows wait; "
                    "it recovers after %.0fs without another", rows, exc, cap, self.batch_size, len(aside),
                    self.cap.recovery_s)
        if self.metrics is not None:
            self.metrics.observe_out_of_memory()

    def _retire(self, request_ids: list[str]) -> None:
        """These requests failed: drop them from the engine and forget them everywhere."""
        self.engine.abort([rid for rid in request_ids if rid in self._active])
        with self._lock:
            for request_id in request_ids:
                self._active.pop(request_id, None)
                self._running.pop(request_id, None)
                self._cancelled.discard(request_id)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        deliveries: list[tuple[Submission, TokenEvent]] = []
        finished: list[str] = []
        with self._lock:
            for event in events:
                entry = self._active.get(event.request_id)
                if entry is None:
                    continue
                if event.request_id not in self._cancelled:
                    deliveries.append((entry.submission, event))
                if event.finished:
                    finished.append(event.request_id)
                    self._active.pop(event.request_id)
                    if event.request_id in self._suspended:  # its last event came from a failed step
                        self._suspended.remove(event.request_id)
                    self._running.pop(event.request_id, None)
                    self._cancelled.discard(event.request_id)
        if deliveries:
            self._call_soon(self._deliver, deliveries)

    def _live(self, active: dict[str, _Entry]) -> list[_Entry]:
        with self._lock:
            return [e for rid, e in active.items() if rid not in self._cancelled]

    def _fail(self, entries: list[_Entry], exc: BaseException) -> None:
        for submission in {id(e.submission): e.submission for e in entries}.values():
            self._call_soon(submission.put, exc)

    def _call_soon(self, callback: object, *args: object) -> None:
        assert self._loop is not None
        # RuntimeError: the loop closed under us during shutdown, so nobody is waiting any more
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)  # type: ignore[arg-type]

    # ---- back on the event loop ----------------------------------------------------------------------
    def _deliver(self, deliveries: list[tuple[Submission, TokenEvent]]) -> None:
        now = time.monotonic()
        for submission, event in deliveries:
            if submission.first_token_at is None and event.num_tokens > 0:
                submission.first_token_at = now
                if self.metrics is not None:
                    self.metrics.observe_first_token(now - submission.arrived_at)
            if self.metrics is not None:
                self.metrics.observe_tokens(event.num_tokens)
            submission.put(event)

    @staticmethod
    def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
