"""HTTP routes of eval and data-generation jobs: submit, follow, list, count, cancel, download outputs.

    POST /eval/jobs              GET /eval/jobs/{id}       POST /eval/jobs/{id}/cancel
    GET /eval/jobs/{id}/samples
    POST /data_gen/jobs          GET /data_gen/jobs/{id}   POST /data_gen/jobs/{id}/cancel
    GET /data_gen/jobs/{id}/shards/{file}
    GET /jobs?type=&status=&limit=   GET /jobs/stats   GET /jobs/{id}   POST /jobs/{id}/cancel
    GET /eval/jobs, GET /data_gen/jobs (= GET /jobs?type=...)

With --api-key every route needs a key, and a job belongs to the key that created it (another key gets 404).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from lb.datastore import connect, data_path
from lb.errors import ModelNotFound, NotFound, answers_errors
from lb.jobs import data_gen, eval_job
from lb.jobs.auth import owner_of
from lb.jobs.job_runner import JobRunner
from lb.jobs.job_store import JOB_TYPES, STATUSES, Job, JobStore
from lb.jobs.request_fields import InvalidField, json_object
from lb.model_routing import normalise
from lb.state import STATE, BalancerState

log = logging.getLogger("lb.jobs")

LIST_LIMIT = (20, 1000)  # default and largest `limit` of GET /jobs


class JobNotFound(NotFound):
    code = "job_not_found"


def _state(request: web.Request) -> BalancerState:
    return request.app[STATE]


def check_model(state: BalancerState, model_id: str) -> None:
    """404 naming `model_id` unless a worker serves it (exactly or by normalised name); any model when no
    worker announces its models."""
    served = {m for b in state.pool.backends if not b.removed for m in b.models}
    if served and model_id not in served and normalise(model_id) not in {normalise(m) for m in served}:
        raise ModelNotFound(
            f"The model '{model_id}' is not served by this balancer. "
            f"Available models: {', '.join(sorted(served))}",
            param="model_id",
        )


def datasets_dir(state: BalancerState) -> Path:
    configured = state.config.datasets_dir
    return Path(configured).expanduser() if configured else data_path(state.config.data_dir) / "datasets"


def job_json(runner: JobRunner, job: Job) -> dict[str, Any]:
    request = {k: v for k, v in job.request.items() if k not in ("name", "model_id", "lines_per_phase")}
    return {
        "id": job.id,
        "object": "job",
        "type": job.type,
        "name": job.name,
        "model_id": job.model_id,
        "status": job.status,
        "created_at": int(job.created_at),
        "started_at": int(job.started_at) if job.started_at else None,
        "finished_at": int(job.finished_at) if job.finished_at else None,
        "progress": runner.progress(job),
        "batch_ids": job.batch_ids,
        "request": request,
        "result": job.result,
        "error": job.error,
    }


def _job(request: web.Request, type_: str | None) -> Job:
    job = _state(request).jobs.store.get(request.match_info["job_id"], owner_of(request))
    if job is None or (type_ is not None and job.type != type_):
        raise JobNotFound(
            f"No {'job' if type_ is None else type_ + ' job'} {request.match_info['job_id']!r}.",
            param="job_id",
        )
    return job


PARSERS = {"eval": eval_job.parse, "data_gen": data_gen.parse}


async def create(request: web.Request) -> web.Response:
    """POST /eval/jobs and /data_gen/jobs: validate everything (dataset lines in a thread), then submit."""
    type_ = request.match_info["type"]
    state, owner = _state(request), owner_of(request)
    body = await json_object(request)
    parse = PARSERS[type_]
    spec = await asyncio.to_thread(parse, body, datasets_dir(state), state.config.batch_max_lines)
    check_model(state, spec.request["model_id"])
    job = await state.jobs.submit(type_, owner, spec)
    return web.json_response(job_json(state.jobs, job))


async def get(request: web.Request) -> web.Response:
    """GET /jobs/{id}, or /eval/jobs/{id} and /data_gen/jobs/{id} (404 for a job of the other type)."""
    return web.json_response(job_json(_state(request).jobs, _job(request, request.match_info.get("type"))))


async def cancel(request: web.Request) -> web.Response:
    runner = _state(request).jobs
    job = await runner.cancel(_job(request, request.match_info.get("type")))
    return web.json_response(job_json(runner, job))


async def list_jobs(request: web.Request) -> web.Response:
    query = request.query
    type_ = request.match_info.get("type") or query.get("type") or None  # GET /eval/jobs: that type only
    status = query.get("status") or None
    if type_ is not None and type_ not in JOB_TYPES:
        raise InvalidField(f"type must be one of {', '.join(JOB_TYPES)}", param="type")
    if status is not None and status not in STATUSES:
        raise InvalidField(f"status must be one of {', '.join(STATUSES)}", param="status")
    try:
        limit = int(query.get("limit", LIST_LIMIT[0]))
    except ValueError:
        limit = 0
    if not 1 <= limit <= LIST_LIMIT[1]:
        raise InvalidField(f"limit must be an integer from 1 to {LIST_LIMIT[1]}", param="limit")
    runner = _state(request).jobs
    jobs = runner.store.list(type_=type_, status=status, owner=owner_of(request), limit=limit)
    return web.json_response({"object": "list", "data": [job_json(runner, j) for j in jobs]})


async def job_stats(request: web.Request) -> web.Response:
    runner = _state(request).jobs
    owner = owner_of(request)
    per_status, last_hour = runner.store.counts(owner, time.time() - 3600)
    active = runner.store.list(type_=None, status="running", owner=owner, limit=LIST_LIMIT[1])
    return web.json_response(
        {
            "pending": per_status["pending"],
            "running": per_status["running"] + per_status["cancelling"],
            "done": per_status["completed"],
            "failed": per_status["failed"],
            "cancelled": per_status["cancelled"],
            "total": sum(per_status.values()),
            "jobs_last_hour": last_hour,
            "running_jobs": [
                {"id": j.id, "type": j.type, "name": j.name, "progress": runner.progress(j)} for j in active
            ],
        }
    )


async def eval_samples(request: web.Request) -> web.StreamResponse:
    job = _job(request, "eval")
    result = job.result or {}
    if not result.get("samples_file"):
        raise NotFound(
            f"Job {job.id} has no samples file (it has not finished, or per_example_logging was off)."
        )
    return web.FileResponse(
        _state(request).jobs.job_dir(job.id) / result["samples_file"],
        headers={"Content-Type": "application/jsonl"},
    )


async def data_gen_shard(request: web.Request) -> web.StreamResponse:
    job = _job(request, "data_gen")
    name = request.match_info["file"]
    shards = {s["file"] for s in (job.result or {}).get("shards", [])}
    if name not in shards:  # only names the job wrote: nothing else in its directory is served
        raise NotFound(
            f"Job {job.id} has no shard {name!r}; shards: {', '.join(sorted(shards)) or '(none yet)'}."
        )
    return web.FileResponse(
        _state(request).jobs.job_dir(job.id) / name, headers={"Content-Type": "application/jsonl"}
    )


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/{type:eval|data_gen}/jobs", answers_errors(create))
    router.add_get("/{type:eval|data_gen}/jobs/{job_id}", answers_errors(get))
    router.add_get("/eval/jobs/{job_id}/samples", answers_errors(eval_samples))
    router.add_get("/data_gen/jobs/{job_id}/shards/{file}", answers_errors(data_gen_shard))
    router.add_post("/{type:eval|data_gen}/jobs/{job_id}/cancel", answers_errors(cancel))
    router.add_get("/{type:eval|data_gen}/jobs", answers_errors(list_jobs))
    router.add_get("/jobs", answers_errors(list_jobs))
    router.add_get("/jobs/stats", answers_errors(job_stats))
    router.add_get("/jobs/{job_id}", answers_errors(get))
    router.add_post("/jobs/{job_id}/cancel", answers_errors(cancel))
    app.cleanup_ctx.append(_runner)


async def _runner(app: web.Application) -> AsyncIterator[None]:
    """Start-up, after the batch service: open the jobs table, resume unfinished jobs; stop on shutdown."""
    state = app[STATE]
    db = connect(state.config.data_dir)
    root = data_path(state.config.data_dir) / "jobs"
    root.mkdir(exist_ok=True, mode=0o700)
    datasets_dir(state).mkdir(parents=True, exist_ok=True)
    state.jobs = JobRunner(JobStore(db), state.batches, root)
    resumed = len(state.jobs.store.active())
    if resumed:
        log.info("resuming %d unfinished job(s)", resumed)
    task = asyncio.create_task(state.jobs.run(), name="lb-jobs")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    db.close()
