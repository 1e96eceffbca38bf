"""The job runner: moves every unfinished job through its phases, one internal batch per phase.

One background task looks at the active jobs (from the database, so it also resumes those a killed balancer
left behind) each `poll_interval` seconds, or at once when kicked: a phase without a batch gets one (its
lines built by the job's kind), a batch that ended moves the job to its next phase or to its post-processing
(scoring, shards), which runs in a thread and writes whole files, so running it again after a restart is
harmless. The batches themselves are durable and resume on their own (BatchService).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from lb.errors import BalancerError
from lb.jobs.data_gen import DataGenKind
from lb.jobs.eval_job import EvalKind
from lb.jobs.job_store import INPUTS, Job, JobSpec, JobStore
from lb.jobs.records import write_jsonl

log = logging.getLogger("lb.jobs")

ENDPOINT = "/v1/chat/completions"
RUNNING_BATCH = ("validating", "in_progress", "finalizing", "cancelling")
Lines = list[dict[str, Any]]


class Batches(Protocol):
    """The part of the balancer's BatchService (lb/jobs) a job uses."""

    async def create_internal(
        self, lines: Lines, endpoint: str, *, owner: str | None, metadata: dict[str, str]
    ) -> str: ...

    def get(self, batch_id: str) -> dict[str, Any]: ...

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]: ...

    async def cancel(self, batch_id: str) -> dict[str, Any]: ...


class JobKind(Protocol):
    """An eval or data-generation job's own steps around its batches."""

    type: str

    def phases(self, job: Job) -> int: ...

    def lines(self, job: Job, job_dir: Path, phase: int, earlier: list[Lines]) -> Lines: ...

    def finish(self, job: Job, job_dir: Path, results: list[Lines]) -> dict[str, Any]: ...


KINDS: dict[str, JobKind] = {"eval": EvalKind(), "data_gen": DataGenKind()}


class JobRunner:
    def __init__(self, store: JobStore, batches: Batches, root: Path, poll_interval: float = 0.25) -> None:
        self.store = store
        self.batches = batches
        self.root = root  # data_dir/jobs: one directory per job
        self.poll_interval = poll_interval
        self._kick = asyncio.Event()

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    async def submit(self, type_: str, owner: str | None, spec: JobSpec) -> Job:
        """Write the job's inputs (in a thread), then its row: a job in the database always has its inputs."""
        job_id = self.store.new_id(type_)
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True, mode=0o700)
        try:
            await asyncio.to_thread(write_jsonl, job_dir / INPUTS, spec.inputs)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        request = spec.request
        job = self.store.create(job_id, type_, request["name"], request["model_id"], owner, request)
        log.info("job %s (%s, model %s) submitted", job.id, type_, job.model_id)
        self._kick.set()
        return job

    async def cancel(self, job: Job) -> Job:
        """Stop dispatching the job's batch; in-flight lines finish and the runner keeps what completed."""
        job = self.store.request_cancel(job)
        if job.status == "cancelling" and job.current_batch is not None:
            # a batch that finished meanwhile refuses: the runner takes the job from there
            with contextlib.suppress(BalancerError):
                await self.batches.cancel(job.current_batch)
        self._kick.set()
        return job

    def progress(self, job: Job) -> dict[str, Any]:
        """Lines done over all phases: {total, completed, failed, percent} (for /jobs and the dashboard)."""
        kind = KINDS[job.type]
        total = job.request["lines_per_phase"] * kind.phases(job)
        completed = failed = 0
        for batch_id in job.batch_ids:
            counts = self._batch(batch_id).get("request_counts") or {}
            completed += counts.get("completed", 0)
            failed += counts.get("failed", 0)
        done = completed + failed
        percent = 100.0 if job.status == "completed" else round(100.0 * done / total, 1) if total else 0.0
        return {"total": total, "completed": completed, "failed": failed, "percent": min(percent, 100.0)}

    def _batch(self, batch_id: str) -> dict[str, Any]:
        try:
            return self.batches.get(batch_id)
        except BalancerError:  # not found: nothing to show
            return {}

    async def run(self) -> None:
        """The background task: advance every active job, sleep until kicked or `poll_interval` passes."""
        while True:
            for job in self.store.active():
                try:
                    await self._advance(job)
                except asyncio.CancelledError:
                    raise
                except BalancerError as exc:
                    log.warning("job %s failed: %s", job.id, exc.message)
                    self.store.finish(job, "failed", job.result, exc.message)
                except Exception as exc:  # the task's outer edge: one broken job must not stop the others
                    log.exception("job %s failed", job.id)
                    self.store.finish(job, "failed", job.result, f"{type(exc).__name__}: {exc}")
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.poll_interval)

    async def _advance(self, job: Job) -> None:
        kind = KINDS[job.type]
        batch_id = job.current_batch
        if batch_id is None:
            if job.status == "cancelling":
                await self._finish(job, kind, "cancelled")
                return
            earlier = [await self._results(b) for b in job.batch_ids[: job.phase]]
            lines = await asyncio.to_thread(kind.lines, job, self.job_dir(job.id), job.phase, earlier)
            if not lines:  # e.g. no phase-one line of a self-instruct job gave an instruction
                await self._finish(job, kind, "completed")
                return
            metadata = {"job_id": job.id, "phase": str(job.phase), "job_type": job.type}
            batch_id = await self.batches.create_internal(lines, ENDPOINT, owner=job.owner, metadata=metadata)
            job = self.store.start_phase(job, batch_id)
            log.info("job %s phase %d: batch %s with %d lines", job.id, job.phase, batch_id, len(lines))
            if job.status == "cancelling":  # cancelled while its batch was being created
                await self.batches.cancel(batch_id)
            return
        batch = self.batches.get(batch_id)
        status = batch["status"]
        if status in RUNNING_BATCH:
            return
        if status == "failed":
            self.store.finish(job, "failed", None, f"batch {batch_id} failed: {_errors(batch)}")
            log.warning("job %s failed: batch %s failed", job.id, batch_id)
            return
        if status == "completed" and job.status != "cancelling" and job.phase + 1 < kind.phases(job):
            self.store.next_phase(job)
            self._kick.set()
            return
        if status == "expired":
            await self._finish(job, kind, "failed", f"batch {batch_id} expired before every line ran")
        else:
            await self._finish(job, kind, "cancelled" if job.status == "cancelling" else "completed")

    async def _results(self, batch_id: str) -> Lines:
        """A batch's output and error records, read in a thread (a batch may hold 100k lines)."""
        records = self.batches.results(batch_id)
        first = next(records, None)  # the database lookup runs here, on the loop; the rest is file reading
        if first is None:
            return []
        return [first, *await asyncio.to_thread(list, records)]

    async def _finish(self, job: Job, kind: JobKind, status: str, error: str | None = None) -> None:
        """Post-process what came back (partial for cancelled or expired jobs) and record the result."""
        results = [await self._results(b) for b in job.batch_ids]
        results += [[] for _ in range(kind.phases(job) - len(results))]
        result = await asyncio.to_thread(kind.finish, job, self.job_dir(job.id), results)
        self.store.finish(job, status, result, error)
        log.info(
            "job %s %s: %s", job.id, status, {k: v for k, v in result.items() if not isinstance(v, list)}
        )


def _errors(batch: dict[str, Any]) -> str:
    errors = batch.get("errors") or {}
    data = errors.get("data", []) if isinstance(errors, dict) else errors
    if not data:
        return "no reason given"
    first = data[0]
    return f"{first.get('code')}: {first.get('message')}" + (
        f" (and {len(data) - 1} more)" if len(data) > 1 else ""
    )
