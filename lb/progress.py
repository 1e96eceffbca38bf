"""Running batches and jobs with their progress, as the dashboard's bars show them.

Read by the telemetry gatherer once per round (jobs' progress is in SQLite: never on a request's path).
"""

from __future__ import annotations

import time
from typing import Any

from lb.state import BalancerState


def running_work(state: BalancerState) -> list[dict[str, Any]]:
    """One record per running batch and unfinished job: id, kind, status, total, completed (done, failed
    included), failed, eta_s (None when the rate is not known yet)."""
    work: list[dict[str, Any]] = []
    batches = getattr(state, "batches", None)  # set at start-up; absent while starting
    if batches is not None:
        for run in list(batches.dispatcher.runs.values()):
            work.append(
                {
                    "id": run.batch_id,
                    "kind": "batch",
                    "status": run.stopping or "in_progress",
                    "total": run.total,
                    "completed": run.completed + run.failed,
                    "failed": run.failed,
                    "eta_s": None,  # the page estimates it from successive polls
                }
            )
    jobs = getattr(state, "jobs", None)
    if jobs is not None:
        now = time.time()
        for job in jobs.store.active():
            progress = jobs.progress(job)
            done = progress["completed"] + progress["failed"]
            elapsed = now - job.started_at if job.started_at else 0.0
            eta = (progress["total"] - done) * elapsed / done if done and elapsed > 0 else None
            work.append(
                {
                    "id": job.id,
                    "kind": job.type,
                    "name": job.name,
                    "status": job.status,
                    "total": progress["total"],
                    "completed": done,
                    "failed": progress["failed"],
                    "eta_s": round(eta, 1) if eta is not None else None,
                }
            )
    return work
