"""What one balancer app holds (config, pool, routing, admission, proxy, lifecycle), under one AppKey."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from lb.admin import Admin
from lb.admission import Admission
from lb.backends import BackendPool
from lb.config import BalancerConfig
from lb.health import HealthChecker
from lb.jobs.batches import BatchService
from lb.jobs.job_runner import JobRunner
from lb.metrics import Metrics
from lb.model_routing import ModelRouter
from lb.proxy import Proxy
from lb.rollout import Switcher
from lb.telemetry import TelemetryGatherer


@dataclass
class BalancerState:
    """Built by `create_app`; the parts needing a running loop (session, checker, proxy) are set at start-up.

    Handlers read it as `request.app[STATE]`; a feature with state of its own adds one field here and one
    `add_routes(app)` call in `lb/app.py`.
    """

    config: BalancerConfig
    pool: BackendPool
    router: ModelRouter
    admission: Admission
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    draining: bool = False  # set when shutdown begins: /health answers 503
    log_files: dict[str, str] = field(default_factory=dict)  # GET /logs/NAME -> path (--log-file)
    # set by the start-up context (lb/app.py), before the first request is served
    session: aiohttp.ClientSession = field(init=False)
    health: HealthChecker = field(init=False)
    admin: Admin = field(init=False)
    proxy: Proxy = field(init=False)
    batches: BatchService = field(init=False)  # files, batches and the internal API for jobs (lb/jobs/)
    jobs: JobRunner = field(init=False)  # eval and data-generation jobs (lb/jobs/api_jobs.py)
    telemetry: TelemetryGatherer = field(init=False)
    switcher: Switcher = field(init=False)  # checkpoint registry and rolling model switch (lb/rollout.py)


STATE = web.AppKey("balancer_state", BalancerState)
