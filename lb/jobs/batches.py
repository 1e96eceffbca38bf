"""BatchService: the files and batches state machine, and the internal API other balancer parts call.

    validating ─▶ in_progress ─▶ finalizing ─▶ completed
        │              ├──▶ cancelling ─▶ cancelled      (in-flight lines finish, completed ones are kept)
        └▶ failed      └──▶ expired                      (unsent lines get `batch_expired` errors)

Internal API (eval / data-generation jobs, /solve/*): `create_internal`, `get`, `results`, `cancel`,
`send_one`. A batch made with `create_internal` is an ordinary batch: validated, durable, resumable, listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from lb.admission import Admission
from lb.backends import BackendPool
from lb.config import BalancerConfig
from lb.datastore import connect
from lb.errors import BalancerError
from lb.health import HealthChecker
from lb.jobs.dispatcher import Dispatcher
from lb.jobs.errors import BatchNotFound, FileNotFound, InvalidJobRequest
from lb.jobs.files import FileStore
from lb.jobs.objects import batch_object, check_metadata, file_object, window_seconds
from lb.jobs.results import read_records
from lb.jobs.run import BatchRun
from lb.jobs.sender import Sender, refusal
from lb.jobs.store import TERMINAL, JobStore, new_id, now
from lb.jobs.validate import ENDPOINTS, Limits, LineError, validate_file
from lb.metrics import Metrics
from lb.model_routing import ModelRouter, normalise
from lb.upstream import UpstreamClient

log = logging.getLogger("lb.jobs")


class BatchService:
    def __init__(
        self,
        config: BalancerConfig,
        pool: BackendPool,
        router: ModelRouter,
        admission: Admission,
        health: HealthChecker,
        metrics: Metrics,
        client: UpstreamClient,
    ) -> None:
        self.config = config
        self._pool = pool
        self.store = JobStore(connect(config.data_dir))
        self.files = FileStore(config.data_dir)
        self.sender = Sender(pool, router, admission, health, metrics, client, config.batch_line_retries)
        self.dispatcher = Dispatcher(self.sender, self._finished, self._progress)
        self.limits = Limits(config.batch_max_lines, config.batch_max_file_size, config.max_body_size)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    # lifecycle
    async def start(self) -> None:
        """Resume every unfinished batch from the database and its result files, then start dispatching."""
        for row in self.store.unfinished():
            log.info(
                "resuming batch %s (%s, %d/%d done)",
                row["id"],
                row["status"],
                row["completed"] + row["failed"],
                row["total"],
            )
            if row["status"] == "validating":
                self._spawn(self._validate(row["id"]))
            else:
                self._start_run(row, stopping="cancelled" if row["status"] == "cancelling" else None)
        self._loop_task = asyncio.create_task(self.dispatcher.run(), name="lb-batches")

    def pause(self) -> None:
        """Shutdown has begun: dispatch no more lines, so the drain waits only for those on a worker."""
        self.dispatcher.pause()

    async def stop(self) -> None:
        """Stop dispatching; lines in flight are dropped unrecorded and sent again after a restart."""
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        self.store.db.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # files
    async def upload(
        self, owner: str | None, purpose: str, filename: str, chunks: AsyncIterator[bytes]
    ) -> dict[str, Any]:
        file_id = new_id("file")
        size = await self.files.save_stream(file_id, chunks, self.config.batch_max_file_size)
        return file_object(self._record_file(file_id, owner, purpose, filename, size, now()))

    def _record_file(
        self, file_id: str, owner: str | None, purpose: str, filename: str, size: int, created: int
    ) -> dict[str, Any]:
        """Store the row of a file already on disk under its id; returns the row."""
        row = {
            "id": file_id,
            "owner": owner,
            "purpose": purpose,
            "filename": filename,
            "bytes": size,
            "created_at": created,
            "path": self.files.relative(file_id),
        }
        self.store.add_file(row)
        return row

    def file_row(self, file_id: str, owner: str | None) -> dict[str, Any]:
        row = self.store.file(file_id, owner)
        if row is None:
            raise FileNotFound(f"No such file: {file_id!r}.", param="file_id")
        return row

    def file_path(self, file_id: str, owner: str | None) -> Path:
        return self.files.path(self.file_row(file_id, owner)["path"])

    def delete_file(self, file_id: str, owner: str | None) -> dict[str, Any]:
        row = self.file_row(file_id, owner)
        self.store.delete_file(file_id)
        self.files.delete(row["path"])
        return {"id": file_id, "object": "file", "deleted": True}

    # batches
    async def create(
        self,
        owner: str | None,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> dict[str, Any]:
        """Record the batch as `validating` and validate its file in the background; returns the object."""
        if endpoint not in ENDPOINTS:
            raise InvalidJobRequest(
                f"Unsupported endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}.",
                code="unsupported_endpoint",
                param="endpoint",
            )
        window = window_seconds(completion_window)
        check_metadata(metadata)
        source = self.file_row(input_file_id, owner)
        if source["purpose"] != "batch":
            raise InvalidJobRequest(
                f"File {input_file_id!r} has purpose {source['purpose']!r}, not 'batch'.",
                code="invalid_file_purpose",
                param="input_file_id",
            )
        created = now()
        batch_id = new_id("batch")
        self.store.add_batch(
            {
                "id": batch_id,
                "owner": owner,
                "endpoint": endpoint,
                "input_file_id": input_file_id,
                "completion_window": completion_window,
                "status": "validating",
                "created_at": created,
                "expires_at": created + window,
                "out_id": new_id("file"),
                "err_id": new_id("file"),
                "metadata": metadata or {},
            }
        )
        log.info("batch %s created from %s for %s", batch_id, input_file_id, endpoint)
        self._spawn(self._validate(batch_id))
        return self.get(batch_id)

    async def create_internal(
        self, lines: list[dict[str, Any]], endpoint: str, *, owner: str | None, metadata: dict[str, str]
    ) -> str:
        """A batch from request lines in OpenAI's form ({custom_id, method, url, body}); returns its id.

        The lines are written as an input file, then validated and run like any uploaded batch.
        """
        file_id = new_id("file")
        size = self.files.save_lines(file_id, (json.dumps(line).encode() for line in lines))
        self._record_file(file_id, owner, "batch", "internal.jsonl", size, now())
        batch = await self.create(owner, file_id, endpoint, "24h", metadata)
        return str(batch["id"])

    def get(self, batch_id: str) -> dict[str, Any]:
        """The OpenAI batch object, whoever owns it (internal callers)."""
        return self._object(self._batch_row(batch_id))

    def retrieve(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        """The batch object for its owner; another key gets 404, as if it did not exist."""
        row = self._batch_row(batch_id)
        if row["owner"] != owner:
            raise BatchNotFound(f"No such batch: {batch_id!r}.", param="batch_id")
        return self._object(row)

    def _batch_row(self, batch_id: str) -> dict[str, Any]:
        row = self.store.batch(batch_id)
        if row is None:
            raise BatchNotFound(f"No such batch: {batch_id!r}.", param="batch_id")
        return row

    def page(self, owner: str | None, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        rows = self.store.batches(owner, after, limit + 1)
        return [self._object(r) for r in rows[:limit]], len(rows) > limit

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop dispatching the batch; in-flight lines finish, completed ones are kept."""
        row = self._batch_row(batch_id)
        if row["status"] in ("validating", "in_progress"):
            log.info("batch %s cancelling", batch_id)
            self.store.update_batch(batch_id, status="cancelling", cancelling_at=now())
            self.dispatcher.stop(batch_id, "cancelled")
        elif row["status"] in TERMINAL and row["status"] != "cancelled":
            raise InvalidJobRequest(
                f"Batch {batch_id!r} is {row['status']} and cannot be cancelled.",
                code="batch_not_cancellable",
                param="batch_id",
            )
        return self.get(batch_id)

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """The output records, then the error records written so far (OpenAI's output-line shape)."""
        row = self._batch_row(batch_id)
        for file_id in (row["out_id"], row["err_id"]):
            yield from read_records(self.files.path(self.files.relative(file_id)))

    async def send_one(self, path: str, body: dict[str, Any], *, bulk: bool) -> tuple[int, dict[str, Any]]:
        """One request through admission, policy and upstream like a proxied one (retried on another worker
        like a batch line); (status, JSON body). Admission refusals come back as their 4xx/5xx error body."""
        try:
            outcome = await self.sender.send(path, body, bulk=bulk, patient=False)
        except BalancerError as exc:
            return refusal(exc)
        if outcome.status is None:
            return 502, {
                "error": {
                    "message": outcome.body.get("message"),
                    "type": "upstream_error",
                    "param": None,
                    "code": "bad_gateway",
                }
            }
        return outcome.status, outcome.body if isinstance(outcome.body, dict) else {"text": outcome.body}

    def running(self) -> list[dict[str, Any]]:
        """For /stats: each batch being dispatched, with its progress."""
        return [
            {
                "id": run.batch_id,
                "endpoint": run.endpoint,
                "status": "cancelling" if run.stopping == "cancelled" else "in_progress",
                "total": run.total,
                "completed": run.completed,
                "failed": run.failed,
                "in_flight": run.in_flight,
                "output_tokens": run.tokens_out,
            }
            for run in self.dispatcher.runs.values()
        ]

    # the state machine's steps
    async def _validate(self, batch_id: str) -> None:
        row = self.store.batch(batch_id)
        assert row is not None
        source = self.store.file(row["input_file_id"], row["owner"])
        if source is None:
            errors: list[LineError] = [
                {
                    "code": "file_not_found",
                    "message": "The input file was deleted.",
                    "param": "input_file_id",
                    "line": None,
                }
            ]
            count = 0
        else:
            count, errors = await asyncio.to_thread(
                validate_file,
                self.files.path(source["path"]),
                row["endpoint"],
                self.limits,
                self._served_models(),
            )
        status = self.store.batch(batch_id)["status"]  # type: ignore[index]
        if status == "cancelling":
            self.store.update_batch(batch_id, status="cancelled", cancelled_at=now(), total=count)
            return
        if errors:
            log.info("batch %s failed validation: %s", batch_id, errors[0]["message"])
            self.store.update_batch(
                batch_id,
                status="failed",
                failed_at=now(),
                total=count,
                errors={"object": "list", "data": errors},
            )
            return
        self.store.update_batch(batch_id, status="in_progress", in_progress_at=now(), total=count)
        log.info("batch %s validated: %d requests", batch_id, count)
        row = self.store.batch(batch_id)
        assert row is not None
        self._start_run(row, stopping=None)

    def _served_models(self) -> frozenset[str] | None:
        backends = [b for b in self._pool.backends if not b.removed]
        if backends and not any(b.models for b in backends):
            return None  # the workers do not say what they serve: any model may be right
        return frozenset(normalise(m) for b in backends for m in b.models)

    def _start_run(self, row: dict[str, Any], stopping: str | None) -> None:
        source = self.store.file(row["input_file_id"], row["owner"])
        assert source is not None, f"batch {row['id']}: input file missing"
        run = BatchRun(
            row["id"],
            row["endpoint"],
            self.files.path(source["path"]),
            self.files.path(self.files.relative(row["out_id"])),
            self.files.path(self.files.relative(row["err_id"])),
            row["expires_at"],
        )
        run.total = row["total"]
        run.stopping = stopping
        self.dispatcher.add(run)

    def _progress(self, run: BatchRun) -> None:
        progress = (run.completed, run.failed, run.tokens_in, run.tokens_out)
        if progress != run.saved:
            self.store.update_batch(
                run.batch_id,
                completed=progress[0],
                failed=progress[1],
                input_tokens=progress[2],
                output_tokens=progress[3],
            )
            run.saved = progress

    async def _finished(self, run: BatchRun) -> None:
        """Every line has its result (or the batch stopped): publish the result files, set the end status."""
        row = self.store.batch(run.batch_id)
        assert row is not None
        stamp = now()
        self._progress(run)
        if run.stopping is None:
            self.store.update_batch(run.batch_id, status="finalizing", finalizing_at=stamp)
        for file_id in (row["out_id"], row["err_id"]):
            relative = self.files.relative(file_id)
            self.files.path(relative).touch()
            kind = "output" if file_id == row["out_id"] else "error"
            self._record_file(file_id, row["owner"], "batch_output", f"{run.batch_id}_{kind}.jsonl",
                              self.files.size(relative), stamp)
        end = {None: "completed", "cancelled": "cancelled", "expired": "expired"}[run.stopping]
        self.store.update_batch(
            run.batch_id,
            status=end,
            **{f"{end}_at": now()},
            output_file_id=row["out_id"],
            error_file_id=row["err_id"] if run.failed else None,
        )
        log.info("batch %s %s: %d completed, %d failed", run.batch_id, end, run.completed, run.failed)

    def _object(self, row: dict[str, Any]) -> dict[str, Any]:
        return batch_object(row, self.dispatcher.runs.get(row["id"]))
