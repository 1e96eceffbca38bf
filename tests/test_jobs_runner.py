"""The job runner (lb/jobs/job_runner.py) over an in-memory batch service: phases, scoring, resume, cancel.

`LocalBatches` is a plain stand-in for the balancer's BatchService with the same five methods: each line is
answered by a function of its body, at once or when the test releases it. The real engine, with real
workers behind the balancer, is exercised in tests/test_jobs_api.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lb.datastore import connect
from lb.jobs import data_gen, eval_job
from lb.jobs.job_runner import JobRunner
from lb.jobs.job_store import JobStore
from lb.jobs.records import read_jsonl


class LocalBatches:
    def __init__(self, answer: Callable[[dict[str, Any]], str], hold: bool = False) -> None:
        self.answer = answer
        self.hold = hold  # True: lines wait for `complete()`
        self.batches: dict[str, dict[str, Any]] = {}

    async def create_internal(
        self, lines: list[dict[str, Any]], endpoint: str, *, owner: str | None, metadata: dict[str, str]
    ) -> str:
        batch_id = f"batch_{len(self.batches)}"
        self.batches[batch_id] = {"lines": lines, "status": "in_progress", "out": [], "metadata": metadata}
        if not self.hold:
            self.complete(batch_id)
        return batch_id

    def complete(self, batch_id: str, count: int | None = None) -> None:
        batch = self.batches[batch_id]
        todo = batch["lines"][len(batch["out"]) :]
        for line in todo[:count]:
            body = {"choices": [{"message": {"content": self.answer(line["body"])}, "finish_reason": "stop"}]}
            response = {"status_code": 200, "request_id": "r", "body": body}
            batch["out"].append(
                {"id": "x", "custom_id": line["custom_id"], "response": response, "error": None}
            )
        if len(batch["out"]) == len(batch["lines"]) and batch["status"] == "in_progress":
            batch["status"] = "completed"

    def get(self, batch_id: str) -> dict[str, Any]:
        batch = self.batches[batch_id]
        counts = {"total": len(batch["lines"]), "completed": len(batch["out"]), "failed": 0}
        return {"id": batch_id, "status": batch["status"], "request_counts": counts}

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        return iter(list(self.batches[batch_id]["out"]))

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        self.batches[batch_id]["status"] = "cancelled"
        return self.get(batch_id)


def write_dataset(directory: Path, name: str, rows: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def user_text(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


ARITHMETIC = [
    {"prompt": "2 + 5", "answer": "7"},
    {"prompt": "3 * 4", "answer": "12"},
    {"prompt": "9 - 6", "answer": 3},
    {"messages": [{"role": "user", "content": "10 / 2"}], "answer": "5"},
]
# right for the first and third sample, wrong for the others (or without a number at all)
REPLIES = {
    "2 + 5": "2 + 5 = 7. The answer is 7.",
    "3 * 4": "I think \\boxed{13}",
    "9 - 6": "#### 3",
    "10 / 2": "no idea",
}


@pytest.fixture
def runner_for(tmp_path: Path) -> Iterator[Callable[[LocalBatches], JobRunner]]:
    db = connect(str(tmp_path / "data"))
    store = JobStore(db)

    def make(batches: LocalBatches) -> JobRunner:
        return JobRunner(store, batches, tmp_path / "data" / "jobs", poll_interval=0.01)

    yield make
    db.close()


async def run_until(runner: JobRunner, done: Callable[[], bool]) -> None:
    """Run the runner's task until `done()` holds (at most 5 s)."""
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(5):
            while not done():  # noqa: ASYNC110 - the condition lives in the database, nothing signals it
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def submit_eval(runner: JobRunner, datasets: Path, **fields: Any) -> str:
    spec = eval_job.parse({"model_id": "m", "dataset_ref": "arith", **fields}, datasets, 1000)
    job = await runner.submit("eval", None, spec)
    return job.id


async def test_eval_accuracy_is_the_count_of_correct_samples_in_samples_jsonl(
    runner_for, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "ds", "arith.jsonl", ARITHMETIC)
    runner = runner_for(LocalBatches(lambda body: REPLIES[user_text(body)]))
    job_id = await submit_eval(runner, tmp_path / "ds", metrics=["accuracy", "exact_match"])
    await run_until(runner, lambda: runner.store.get(job_id, None).is_finished)
    job = runner.store.get(job_id, None)
    assert job.status == "completed", job.error
    samples = list(read_jsonl(runner.job_dir(job_id) / "samples.jsonl"))
    assert [s["correct"] for s in samples] == [True, False, True, False]
    assert [s["extracted"] for s in samples] == ["7", "13", "3", None]
    assert job.result["correct"] == sum(s["correct"] for s in samples) == 2
    assert job.result["accuracy"] == 0.5 and job.result["total_samples"] == 4
    assert job.result["metrics"]["exact_match"] == 0.0
    assert runner.progress(job) == {"total": 4, "completed": 4, "failed": 0, "percent": 100.0}


async def test_max_samples_takes_the_first_lines_of_the_dataset(runner_for, tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", "arith.jsonl", ARITHMETIC)
    batches = LocalBatches(lambda body: REPLIES[user_text(body)])
    runner = runner_for(batches)
    job_id = await submit_eval(runner, tmp_path / "ds", max_samples=2, temperature=0.5)
    await run_until(runner, lambda: runner.store.get(job_id, None).is_finished)
    lines = batches.batches["batch_0"]["lines"]
    assert [user_text(line["body"]) for line in lines] == ["2 + 5", "3 * 4"]
    assert lines[0]["body"]["temperature"] == 0.5 and lines[0]["body"]["model"] == "m"
    assert runner.store.get(job_id, None).result["total_samples"] == 2


async def test_a_new_runner_resumes_the_job_its_predecessor_left_running(runner_for, tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", "arith.jsonl", ARITHMETIC)
    batches = LocalBatches(lambda body: REPLIES[user_text(body)], hold=True)
    first = runner_for(batches)
    job_id = await submit_eval(first, tmp_path / "ds")
    await run_until(first, lambda: first.store.get(job_id, None).status == "running")
    batches.complete("batch_0")  # the batch goes on while no runner watches (a balancer restarting)
    second = runner_for(batches)
    await run_until(second, lambda: second.store.get(job_id, None).is_finished)
    assert second.store.get(job_id, None).result["correct"] == 2
    assert len(batches.batches) == 1  # reattached to its batch, not sent again


async def test_cancel_keeps_the_samples_that_completed(runner_for, tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", "arith.jsonl", ARITHMETIC)
    batches = LocalBatches(lambda body: REPLIES[user_text(body)], hold=True)
    runner = runner_for(batches)
    job_id = await submit_eval(runner, tmp_path / "ds")
    await run_until(runner, lambda: runner.store.get(job_id, None).status == "running")
    batches.complete("batch_0", count=1)
    job = await runner.cancel(runner.store.get(job_id, None))
    assert job.status == "cancelling" and batches.batches["batch_0"]["status"] == "cancelled"
    await run_until(runner, lambda: runner.store.get(job_id, None).is_finished)
    job = runner.store.get(job_id, None)
    assert job.status == "cancelled"
    assert job.result["total_samples"] == 1 and job.result["correct"] == 1


async def test_self_instruct_writes_the_asked_number_of_examples_in_shards(
    runner_for, tmp_path: Path
) -> None:
    def answer(body: dict[str, Any]) -> str:
        text = user_text(body)
        return f"Describe task {text.count('.')} in detail." if "new task" in text else f"Done: {text}"

    batches = LocalBatches(answer)
    runner = runner_for(batches)
    body = {"model_id": "m", "strategy": "self_instruct", "config": {"num_examples": 5, "shard_size": 2}}
    spec = data_gen.parse(body, tmp_path / "ds", 1000)
    job = await runner.submit("data_gen", None, spec)
    await run_until(runner, lambda: runner.store.get(job.id, None).is_finished)
    job = runner.store.get(job.id, None)
    assert job.status == "completed", job.error
    assert [s["examples"] for s in job.result["shards"]] == [2, 2, 1]
    records = [r for s in job.result["shards"] for r in read_jsonl(runner.job_dir(job.id) / s["file"])]
    assert [r["id"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["output"] == f"Done: {r['instruction']}" for r in records)  # phase two answered phase one
    assert len(batches.batches) == 2 and runner.progress(job)["total"] == 10
