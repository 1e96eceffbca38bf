"""What one worker app holds (config, engine, batcher, metrics, lifecycle status), under one typed AppKey."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from workers.batcher import DynamicBatcher
from workers.config import WorkerConfig
from workers.engines.base import Engine
from workers.errors import NotReady
from workers.metrics import WorkerMetrics
from workers.swap import LoadRecord
from workers.telemetry import CpuPercent, GpuReader

Status = Literal["loading", "ok", "draining", "failed"]


@dataclass
class WorkerState:
    config: WorkerConfig
    engine: Engine
    batcher: DynamicBatcher
    metrics: WorkerMetrics
    status: Status = "loading"
    error: str | None = None  # why loading failed
    gpu: dict[str, Any] | None = None  # filled once the engine is loaded
    load: LoadRecord | None = None  # the latest in-place model swap (POST /admin/load)
    started_at: float = field(default_factory=time.time)
    pid: int = field(default_factory=os.getpid)
    gpus: GpuReader = field(default_factory=GpuReader)  # /gpu, power profiles, GPU gauges
    cpu: CpuPercent = field(default_factory=CpuPercent)  # /system's and the gauges' CPU use

    def require_ready(self) -> None:
        """Generation endpoints call this first: 503 (with Retry-After) unless the worker is serving."""
        if self.status == "loading":
            raise NotReady("the model is still loading")
        if self.status != "ok":
            raise NotReady(f"the worker is {self.status} and accepts no new requests")


STATE = web.AppKey("worker_state", WorkerState)
