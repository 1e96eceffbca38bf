"""Swapping a worker's model in place: drain, unload, load the new one; on failure, load the old one again.

Order (one swap at a time): check the new settings (a bad path or option is refused before anything stops)
→ status "loading" (generation requests get 503, so a balancer retries them elsewhere) → the running
requests finish (cut off after --drain-timeout) → the old engine is closed and its memory released → the new
engine loads on a fresh engine thread → status "ok" under the new name. If the new model fails to load, the
old configuration is loaded again and the failure is kept in `LoadRecord.error` for /health and /admin/load.
The old model is unloaded before the new one loads, so a GPU never needs room for both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lb.settings import ConfigError, coerce_mapping
from workers.batcher import DynamicBatcher
from workers.config import WorkerConfig
from workers.engines import create_engine
from workers.engines.base import Engine

if TYPE_CHECKING:
    from workers.state import WorkerState

log = logging.getLogger("workers.swap")

# the settings POST /admin/load may set; any not given return to their defaults (nothing leaks from the old
# model's loading options into the new one's)
LOAD_KEYS = ("model_path", "served_model_name", "gguf_file", "trust_remote_code", "attn_implementation",
             "quantization", "dcp_path", "base_model", "max_model_len")
LoadState = Literal["loading", "loaded", "failed"]


class SwapRefused(ValueError):
    """The requested model cannot be loaded as asked (bad key, path or option); nothing was changed."""


class SwapBusy(RuntimeError):
    """Another swap is still running."""


@dataclass
class LoadRecord:
    """The latest POST /admin/load, as /health and /admin/load report it."""

    id: int
    model: str  # the name the new model is to be served under
    model_path: str | None
    state: LoadState = "loading"
    error: str | None = None  # why the new model did not load (the old one is serving again)
    drained: bool | None = None  # False: running requests were cut off after --drain-timeout
    started_at: float = field(default_factory=time.time)
    seconds: float | None = None  # wall time of the whole swap

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def begin(state: WorkerState, body: Any) -> tuple[LoadRecord, asyncio.Task[None]]:
    """Check the request, then start the swap in the background; its record and task (for tests)."""
    if state.load is not None and state.load.state == "loading":
        raise SwapBusy(f"a swap to {state.load.model!r} is still running")
    if state.status != "ok":
        raise SwapBusy(f"the worker is {state.status}; a model can be swapped only while it serves")
    config = new_config(state.config, body)
    engine = build_engine(config)
    record = LoadRecord(id=(state.load.id + 1 if state.load else 1), model=config.model_name,
                        model_path=config.model_path or config.dcp_path)
    state.load = record
    state.status = "loading"  # from here on, generation requests get 503 (a balancer retries elsewhere)
    task = asyncio.create_task(run(state, config, engine, record), name=f"swap-{record.id}")
    return record, task


async def run(state: WorkerState, config: WorkerConfig, engine: Engine, record: LoadRecord) -> None:
    """Drain → unload → load the new model (or the old one again); leaves status "ok" unless both fail."""
    started = time.monotonic()
    old_config, old_batcher = state.config, state.batcher
    log.info("swap %d: draining (%d running, %d queued), then %s -> %s", record.id, old_batcher.running,
             old_batcher.queue_depth, old_config.model_name, config.model_name)
    record.drained = await drain(old_batcher, old_config.drain_timeout)
    del old_batcher
    try:
        await _start(state, config, engine)
    except Exception as exc:  # the load's outer edge: report it and bring the old model back
        error = f"{type(exc).__name__}: {exc}"
        log.error("swap %d: %s did not load (%s); loading %s again", record.id, config.model_name, error,
                  old_config.model_name)
        try:
            await _start(state, old_config, create_engine(old_config))
        except Exception as again:  # nothing loaded: the worker reports itself failed
            state.status, state.error = "failed", f"reloading the old model failed too: {again}"
            record.state, record.error = "failed", f"{error}; reloading the old model failed too: {again}"
            record.seconds = elapsed_since(started)
            log.exception("swap %d: reloading %s failed", record.id, old_config.model_name)
            return
        record.state, record.error = "failed", error  # only now: the old model serves again
    else:
        record.state = "loaded"
    record.seconds = elapsed_since(started)
    if state.status == "loading":  # not if a SIGTERM began the worker's own drain meanwhile
        state.status = "ok"
    log.info("swap %d %s in %.1fs: serving %s", record.id, record.state, record.seconds,
             state.config.model_name)


async def _start(state: WorkerState, config: WorkerConfig, engine: Engine) -> None:
    """Load `engine` behind a new batcher that refuses requests (503) until the model is loaded."""
    batcher = DynamicBatcher(engine, batch_size=config.batch_size, max_wait_time=config.max_wait_time,
                             max_queue=config.max_queue, metrics=state.metrics)
    batcher.accepting = False
    state.engine, state.batcher = engine, batcher  # drops the previous engine's last reference
    release_memory()
    try:
        await batcher.start()  # loads on the new engine thread
    except BaseException:
        await batcher.close()
        raise
    batcher.accepting = True
    state.config = config
    state.metrics.model = config.model_name
    state.metrics.track_load(lambda: batcher.queue_depth, lambda: batcher.running)
    state.metrics.track_cap(batcher.cap.current)


def new_config(current: WorkerConfig, body: Any) -> WorkerConfig:
    """The worker's settings with the model-loading ones taken from `body` (others keep their values)."""
    if not isinstance(body, dict):
        raise SwapRefused('the body must be a JSON object like {"model_path": "/path/to/model"}')
    unknown = sorted(set(body) - set(LOAD_KEYS))
    if unknown:
        raise SwapRefused(f"unknown key(s) {', '.join(unknown)}; accepted: {', '.join(LOAD_KEYS)}")
    if not body.get("model_path") and not body.get("dcp_path"):
        raise SwapRefused("model_path (or dcp_path with base_model) is required")
    fields = dataclasses.fields(WorkerConfig)
    defaults: dict[str, Any] = {f.name: f.default for f in fields if f.name in LOAD_KEYS}
    try:
        values = coerce_mapping(WorkerConfig, body, "the request body")
        for f in fields:
            choices = f.metadata.get("choices")
            if f.name in values and choices and values[f.name] not in choices:
                raise SwapRefused(f"{f.name}: must be one of {', '.join(choices)}, got {values[f.name]!r}")
        return dataclasses.replace(current, **(defaults | values))
    except (ConfigError, TypeError) as exc:
        raise SwapRefused(str(exc)) from None


def build_engine(config: WorkerConfig) -> Engine:
    """The engine for `config`, its files and options checked (cheap) but not loaded."""
    try:
        engine = create_engine(config)
        if config.engine == "hf":
            from workers.engines.hf import resolve_device
            from workers.engines.hf_loading import LoadError, LoadSpec, check

            try:
                check(LoadSpec.from_config(config), resolve_device(config.device))
            except LoadError as exc:
                raise SwapRefused(str(exc)) from None
    except ConfigError as exc:
        raise SwapRefused(str(exc)) from None
    return engine


def release_memory() -> None:
    """Give the old model's memory back before the new one loads (its last references are gone by now)."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


async def drain(batcher: DynamicBatcher, limit: float) -> bool:
    """Stop the batcher taking requests, let the running ones finish within `limit` s, then close it."""
    batcher.accepting = False
    drained = await batcher.wait_idle(limit)
    if not drained:
        log.warning("swap: drain deadline passed, cutting off %d running and %d queued requests",
                    batcher.running, batcher.queue_depth)
    await batcher.close()
    return drained


def elapsed_since(started: float) -> float:
    return round(time.monotonic() - started, 3)
