"""Eval and data-generation jobs in the balancer's SQLite database: one row per job, its phases' batches.

A job is a batch (or, for self-instruct, two in sequence) plus pre- and post-processing. The row records
which phase runs and the id of each phase's batch, so a balancer restarted on the same --data-dir picks up
every job that had not finished: the batches resume on their own and the runner reattaches to them.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

JOB_TYPES = ("eval", "data_gen")
STATUSES = ("pending", "running", "cancelling", "completed", "failed", "cancelled")
ACTIVE = ("pending", "running", "cancelling")
FINISHED = ("completed", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,             -- eval | data_gen
    name TEXT NOT NULL,
    model_id TEXT NOT NULL,
    owner TEXT,                     -- a digest of the API key that created it; NULL without --api-key
    status TEXT NOT NULL,           -- see STATUSES
    request TEXT NOT NULL,          -- the validated request, JSON
    phase INTEGER NOT NULL DEFAULT 0,
    batch_ids TEXT NOT NULL DEFAULT '[]',  -- JSON list: one batch id per started phase
    result TEXT,                    -- JSON, once finished (also for cancelled / failed with partial results)
    error TEXT,
    created_at REAL NOT NULL,       -- unix seconds
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
"""


INPUTS = "inputs.jsonl"  # in the job's directory: what its batch lines are built from


@dataclass(frozen=True)
class JobSpec:
    """A validated job request: what the row stores, and the inputs copied into the job's directory."""

    request: dict[str, Any]  # holds at least model_id, name and lines_per_phase
    inputs: list[dict[str, Any]]


@dataclass
class Job:
    id: str
    type: str
    name: str
    model_id: str
    owner: str | None
    status: str
    request: dict[str, Any]
    phase: int = 0
    batch_ids: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def current_batch(self) -> str | None:
        """The batch of the running phase, None while that phase has not created one yet."""
        return self.batch_ids[self.phase] if self.phase < len(self.batch_ids) else None


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        type=row["type"],
        name=row["name"],
        model_id=row["model_id"],
        owner=row["owner"],
        status=row["status"],
        request=json.loads(row["request"]),
        phase=row["phase"],
        batch_ids=json.loads(row["batch_ids"]),
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


class JobStore:
    """The `jobs` table. Every write commits at once: a job's state survives a SIGKILL right after it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.executescript(SCHEMA)
        db.commit()

    @staticmethod
    def new_id(type_: str) -> str:
        return f"{'evaljob' if type_ == 'eval' else 'datagen'}-{secrets.token_hex(12)}"

    def create(
        self, job_id: str, type_: str, name: str, model_id: str, owner: str | None, request: dict[str, Any]
    ) -> Job:
        job = Job(job_id, type_, name, model_id, owner, "pending", request, created_at=time.time())
        with self._db:
            self._db.execute(
                "INSERT INTO jobs (id, type, name, model_id, owner, status, request, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, type_, name, model_id, owner, job.status, json.dumps(request), job.created_at),
            )
        return job

    def get(self, job_id: str, owner: str | None) -> Job | None:
        """The job if `owner` created it (owners are NULL without --api-key)."""
        row = self._db.execute("SELECT * FROM jobs WHERE id = ? AND owner IS ?", (job_id, owner)).fetchone()
        return _job(row) if row is not None else None

    def reload(self, job: Job) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return _job(row)

    def active(self) -> list[Job]:
        """Unfinished jobs, oldest first: what the runner advances (and resumes after a restart)."""
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(ACTIVE))}) ORDER BY created_at", ACTIVE
        )
        return [_job(r) for r in rows]

    def list(self, *, type_: str | None, status: str | None, owner: str | None, limit: int) -> list[Job]:
        """The owner's jobs, newest first, filtered by type and status when given."""
        clauses, args = ["owner IS ?"], [owner]
        for column, value in (("type", type_), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(clauses)} ORDER BY created_at DESC LIMIT ?",
            (*args, limit),
        )
        return [_job(r) for r in rows]

    def counts(self, owner: str | None, since: float) -> tuple[dict[str, int], int]:
        """(the owner's jobs per status, those created since `since`), for /jobs/stats."""
        per_status = dict.fromkeys(STATUSES, 0)
        rows = self._db.execute(
            "SELECT status, COUNT(*) AS n FROM jobs WHERE owner IS ? GROUP BY status", (owner,)
        )
        for row in rows:
            per_status[row["status"]] = row["n"]
        recent = self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE owner IS ? AND created_at >= ?", (owner, since)
        ).fetchone()[0]
        return per_status, int(recent)

    # Each write below updates only the columns it owns, so a cancel (status) and the runner (phase, batches,
    # result) never overwrite each other's change.

    def start_phase(self, job: Job, batch_id: str) -> Job:
        """Record the batch of the current phase; a pending job now runs (a cancelling one stays so)."""
        batch_ids = [*job.batch_ids[: job.phase], batch_id]
        with self._db:
            self._db.execute(
                "UPDATE jobs SET batch_ids = ?, started_at = COALESCE(started_at, ?),"
                " status = CASE status WHEN 'pending' THEN 'running' ELSE status END WHERE id = ?",
                (json.dumps(batch_ids), time.time(), job.id),
            )
        return self.reload(job)

    def next_phase(self, job: Job) -> Job:
        with self._db:
            self._db.execute("UPDATE jobs SET phase = phase + 1 WHERE id = ?", (job.id,))
        return self.reload(job)

    def request_cancel(self, job: Job) -> Job:
        """Mark an unfinished job `cancelling` (the runner finishes it); a finished job is left as it is."""
        with self._db:
            self._db.execute(
                "UPDATE jobs SET status = 'cancelling' WHERE id = ?"
                f" AND status IN ({','.join('?' * len(ACTIVE))})",
                (job.id, *ACTIVE),
            )
        return self.reload(job)

    def finish(self, job: Job, status: str, result: dict[str, Any] | None, error: str | None = None) -> Job:
        with self._db:
            self._db.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ? WHERE id = ?",
                (status, json.dumps(result) if result is not None else None, error, time.time(), job.id),
            )
        return self.reload(job)
