"""DynamicBatcher with the fake engine, in process: batch formation, admit, cancellation, errors, limits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from workers.batch_cap import BatchCap
from workers.batcher import DynamicBatcher
from workers.engines.base import (
    EngineRequest,
    PromptTooLongError,
    SamplingParams,
    TokenEvent,
    run_to_completion,
)
from workers.engines.fake import FakeEngine
from workers.errors import EngineFailed, QueueFull
from workers.metrics import WorkerMetrics


@dataclass
class RecordingEngine(FakeEngine):
    """The fake engine, noting each batch it was given, what joined a running one and which threads ran it."""

    batches: list[list[str]] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    fail_after_steps: int | None = None  # raise RuntimeError after this many steps of a batch
    steps_of_batch: int = 0

    def prepare(self, request: EngineRequest) -> None:
        self.threads.add("prepare:" + threading.current_thread().name)
        super().prepare(request)

    def add(self, requests: list[EngineRequest]) -> None:
        if self.num_running:
            self.admitted.extend(r.request_id for r in requests)
        else:
            self.batches.append([r.request_id for r in requests])
            self.steps_of_batch = 0
        super().add(requests)

    def step(self) -> list[TokenEvent]:
        self.threads.add("step:" + threading.current_thread().name)
        events = super().step()
        self.steps_of_batch += 1
        if self.fail_after_steps is not None and self.steps_of_batch > self.fail_after_steps:
            raise RuntimeError("boom")
        return events


MakeBatcher = Callable[..., DynamicBatcher]


def request(rid: str, max_new_tokens: int = 4, prompt: str = "hello there") -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                     ignore_eos=True))


async def until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll `condition` every 5 ms; fail after `limit` seconds."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - state changes on another thread, no event to await
            await asyncio.sleep(0.005)


async def collect(batcher: DynamicBatcher, *requests: EngineRequest) -> list[TokenEvent]:
    async with batcher.submit(list(requests)) as submission:
        return [event async for event in submission.events()]


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., DynamicBatcher]]:
    made: list[DynamicBatcher] = []

    def _make(engine: FakeEngine, *, batch_size: int = 4, max_wait_time: float = 0.0, max_queue: int = 64,
              metrics: WorkerMetrics | None = None) -> DynamicBatcher:
        batcher = DynamicBatcher(engine, batch_size=batch_size, max_wait_time=max_wait_time,
                                 max_queue=max_queue, metrics=metrics)
        made.append(batcher)
        return batcher

    yield _make
    for batcher in made:
        batcher.accepting = False


@pytest.fixture
async def closing() -> AsyncIterator[list[DynamicBatcher]]:
    started: list[DynamicBatcher] = []
    yield started
    for batcher in started:
        await batcher.close()


async def start(batcher: DynamicBatcher, closing: list[DynamicBatcher]) -> DynamicBatcher:
    await batcher.start()
    closing.append(batcher)
    return batcher


async def test_concurrent_requests_form_batches_up_to_batch_size(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(max_num_seqs=0)  # never admits: every request goes through batch formation
    batcher = await start(make_batcher(engine, batch_size=4, max_wait_time=0.5), closing)
    results = await asyncio.gather(*(collect(batcher, request(f"r{i}")) for i in range(10)))
    assert sorted(len(b) for b in engine.batches) == [2, 4, 4]
    for events in results:
        assert sum(e.num_tokens for e in events) == 4
        assert events[-1].finish_reason == "length"


async def test_lone_request_starts_after_max_wait_time(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine()
    batcher = await start(make_batcher(engine, batch_size=8, max_wait_time=0.05), closing)
    events = await asyncio.wait_for(collect(batcher, request("only")), timeout=5)
    assert engine.batches == [["only"]]
    assert events[-1].finished


async def test_engine_and_tokeniser_run_off_the_event_loop(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine()
    batcher = await start(make_batcher(engine), closing)
    await collect(batcher, request("a"))
    # ThreadPoolExecutor names its threads "<prefix>_<n>"; the loop runs on MainThread
    assert engine.threads == {"prepare:prepare_0", "step:engine"}


async def test_queued_requests_are_admitted_into_a_running_batch(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(step_latency=0.01, max_num_seqs=4)
    metrics = WorkerMetrics("fake-model")
    batcher = await start(make_batcher(engine, batch_size=4, metrics=metrics), closing)
    long_task = asyncio.create_task(collect(batcher, request("long", max_new_tokens=60)))
    await until(lambda: batcher.running > 0)
    short = await asyncio.gather(*(collect(batcher, request(f"short{i}", 3)) for i in range(2)))
    assert not long_task.done(), "short requests joined the running batch and finished first"
    await long_task
    assert engine.batches == [["long"]]
    assert sorted(engine.admitted) == ["short0", "short1"]
    assert all(sum(e.num_tokens for e in events) == 3 for events in short)
    assert metrics.admitted.labels("fake-model")._value.get() == 2


async def test_cancelled_running_request_leaves_the_batch_and_frees_its_slot(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(step_latency=0.01)
    batcher = await start(make_batcher(engine), closing)
    async with batcher.submit([request("endless", max_new_tokens=3000)]) as submission:
        async for _ in submission.events():
            break
        assert batcher.running == 1
    assert batcher.running == 0  # leaving the block cancelled it
    other = await asyncio.wait_for(collect(batcher, request("next", 2)), timeout=5)
    assert other[-1].finished
    assert batcher.is_idle


async def test_cancelled_queued_request_leaves_the_queue(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(step_latency=0.01, max_num_seqs=0)
    batcher = await start(make_batcher(engine, batch_size=1), closing)
    running = asyncio.create_task(collect(batcher, request("first", 50)))
    await until(lambda: batcher.running > 0)
    async with batcher.submit([request("waiting")]):
        assert batcher.queue_depth == 1
    assert batcher.queue_depth == 0
    await running
    assert ["waiting"] not in engine.batches


async def test_engine_exception_fails_every_request_of_its_batch_and_serving_continues(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(fail_after_steps=1, max_num_seqs=0)
    batcher = await start(make_batcher(engine, batch_size=3, max_wait_time=0.5), closing)
    results = await asyncio.gather(*(collect(batcher, request(f"r{i}")) for i in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, EngineFailed) for r in results), results
    engine.fail_after_steps = None
    assert (await collect(batcher, request("after")))[-1].finished


async def test_full_queue_refuses_before_any_work(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(step_latency=0.01, max_num_seqs=0)
    batcher = await start(make_batcher(engine, batch_size=1, max_queue=2), closing)
    first = asyncio.create_task(collect(batcher, request("running", 100)))
    await until(lambda: batcher.running > 0)
    waiting = [asyncio.create_task(collect(batcher, request(f"q{i}", 1))) for i in range(2)]
    await until(lambda: batcher.queue_depth == 2)
    with pytest.raises(QueueFull):
        await collect(batcher, request("one-too-many"))
    assert batcher.queue_depth == 2
    for task in [first, *waiting]:
        task.cancel()
    await asyncio.gather(first, *waiting, return_exceptions=True)


async def test_prompt_too_long_is_refused_before_queueing(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(max_model_len=16)
    batcher = await start(make_batcher(engine), closing)
    with pytest.raises(PromptTooLongError):
        await collect(batcher, request("long", max_new_tokens=4, prompt="word " * 20))
    with pytest.raises(PromptTooLongError):
        await collect(batcher, request("too-many-new", max_new_tokens=15, prompt="two words"))
    assert engine.batches == []
    assert batcher.queue_depth == 0


async def test_fill_context_generates_up_to_the_end_of_the_context(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(max_model_len=12)
    batcher = await start(make_batcher(engine), closing)
    fill = request("fill", max_new_tokens=1, prompt="a b c d")
    async with batcher.submit([fill], fill_context=True) as sub:
        events = [e async for e in sub.events()]
    assert sum(e.num_tokens for e in events) == 12 - 4
    assert events[-1].finish_reason == "length"


async def test_n_requests_of_one_submission_share_its_stream(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine()
    batcher = await start(make_batcher(engine), closing)
    events = await collect(batcher, request("a", 2), request("b", 5))
    assert {e.request_id for e in events if e.finished} == {"a", "b"}
    assert sum(e.num_tokens for e in events) == 7


async def test_close_fails_queued_requests_and_stops_the_engine_thread(make_batcher: MakeBatcher) -> None:
    engine = RecordingEngine(step_latency=0.01, max_num_seqs=0)
    batcher = make_batcher(engine, batch_size=1)
    await batcher.start()
    running = asyncio.create_task(collect(batcher, request("running", 3000)))
    queued = asyncio.create_task(collect(batcher, request("queued")))
    await until(lambda: batcher.queue_depth == 1 and batcher.running == 1)
    await batcher.close()
    assert batcher._thread is not None and not batcher._thread.is_alive()
    with pytest.raises(Exception, match="shutting down"):
        await queued
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


async def test_a_dead_engine_thread_fails_waiting_requests_and_reports_itself(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher]
) -> None:
    engine = RecordingEngine(step_latency=0.01, max_num_seqs=0)
    batcher = await start(make_batcher(engine, batch_size=1), closing)

    def broken_step() -> None:
        raise RuntimeError("bug in the batcher")

    batcher._step = broken_step  # type: ignore[method-assign]
    with pytest.raises(EngineFailed):
        await asyncio.wait_for(collect(batcher, request("doomed")), timeout=5)
    assert batcher.failure is not None and "bug in the batcher" in batcher.failure
    assert not batcher.accepting


@dataclass
class OutOfMemoryEngine(RecordingEngine):
    """Runs out of memory in a step of more than `oom_above` rows once a row holds `oom_from` tokens (memory
    grows with the sequences), with the error `oom` makes."""

    oom_above: int = 2
    oom_from: int = 0
    oom: Callable[[], BaseException] = lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    rows_after_oom: list[int] = field(default_factory=list)  # rows of each step after the first failure
    failed: bool = False

    def step(self) -> list[TokenEvent]:
        longest = max((s.generated for s in self._running), default=0)
        if len(self._running) > self.oom_above and longest >= self.oom_from:
            self.failed = True
            raise self.oom()
        if self.failed:
            self.rows_after_oom.append(len(self._running))
        return super().step()


def torch_oom() -> BaseException:
    import torch

    return torch.OutOfMemoryError("CUDA out of memory")


@pytest.mark.parametrize("oom", [OutOfMemoryEngine.oom, torch_oom], ids=["runtime-error", "torch"])
async def test_out_of_memory_splits_the_batch_and_loses_no_request(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher], oom: Callable[[], BaseException],
) -> None:
    engine = OutOfMemoryEngine(oom_above=2, oom_from=3, oom=oom)  # 8 rows step 3 times, then run out
    metrics = WorkerMetrics("fake-model")
    batcher = await start(make_batcher(engine, batch_size=8, max_wait_time=0.5, metrics=metrics), closing)
    prompts = [f"prompt number {i}" for i in range(8)]
    results = await asyncio.gather(*(collect(batcher, request(f"r{i}", 6, p)) for i, p in enumerate(prompts)))
    alone = FakeEngine()
    for prompt, events in zip(prompts, results, strict=True):
        expected = [e for step in run_to_completion(alone, [request("x", 6, prompt)]) for e in step]
        assert [e.token_ids for e in events] == [e.token_ids for e in expected]  # every token, once, in order
        assert events[-1].finish_reason == "length"
    assert engine.batches[0] == [f"r{i}" for i in range(8)]  # one batch, split inside: 8 -> 4 -> 2 rows
    assert max(engine.rows_after_oom) == 2
    assert batcher.cap.current() == 2 and batcher.cap.out_of_memory_steps == 2
    assert b'worker_out_of_memory_steps_total{model="fake-model"} 2.0' in metrics.render()


async def test_out_of_memory_with_one_row_fails_only_that_request(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher],
) -> None:
    engine = OutOfMemoryEngine(oom_above=0)
    batcher = await start(make_batcher(engine, batch_size=4), closing)
    with pytest.raises(EngineFailed, match="out of memory"):
        await collect(batcher, request("alone"))
    engine.oom_above = 4
    assert (await collect(batcher, request("after")))[-1].finished


def test_batch_cap_halves_on_out_of_memory_and_recovers_after_a_quiet_period() -> None:
    now = [0.0]
    cap = BatchCap(16, recovery_s=10.0, clock=lambda: now[0])
    assert cap.lower(12) == 6 and cap.current() == 6
    now[0] = 9.9
    assert cap.current() == 6
    now[0] = 10.0
    assert cap.current() == 12  # one doubling per quiet period ...
    now[0] = 20.0
    assert cap.current() == 16  # ... never above the batch size
    assert cap.lower(1) == 1  # a single row that does not fit still leaves a cap of one


async def test_rows_set_aside_resume_even_in_an_engine_that_takes_no_joiners(
    make_batcher: MakeBatcher, closing: list[DynamicBatcher],
) -> None:
    engine = OutOfMemoryEngine(oom_above=2, oom_from=3, max_num_seqs=0)  # free_slots() is always 0
    batcher = await start(make_batcher(engine, batch_size=4, max_wait_time=0.5), closing)
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(batcher, request(f"r{i}", 6, f"prompt {i}")) for i in range(4))), timeout=10)
    assert [sum(e.num_tokens for e in events) for events in results] == [6, 6, 6, 6]
