"""The rolling switch: move workers to a registered checkpoint one at a time, without failing a request.

Per worker, in index order: stop routing to it and let its in-flight requests finish (the admin API's drain)
→ POST /admin/load to the worker → poll its /health until it reports the swap's outcome → route to it again
(serving the new model) or, if the load failed, stop: the worker is back on its old model, the workers not
yet switched keep theirs, and the rollout reports why. Meanwhile requests that name the old model go to
workers that still have it, and once none is routable, follow the redirect to the new one. Progress is
`Rollout.as_dict()`, shown by /stats and GET /models/active.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp

from lb.admin import Admin
from lb.backends import Backend, BackendPool
from lb.errors import BalancerError
from lb.model_routing import ModelRouter
from lb.registry import Checkpoint, Registry

log = logging.getLogger("lb.rollout")

POLL = 0.1  # seconds between /health polls while a worker loads
ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=30)  # POST /admin/load answers at once (202)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)
StepState = Literal["pending", "draining", "loading", "done", "failed", "skipped"]


class SwitchInProgress(BalancerError):
    status = 409
    type = "invalid_request_error"
    code = "switch_in_progress"


class SwitchFailed(BalancerError):
    status = 502
    type = "upstream_error"
    code = "switch_failed"


@dataclass
class Step:
    index: int
    url: str
    previous: list[str]  # the models it served before
    state: StepState = "pending"
    drained: bool | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass
class Rollout:
    id: int
    checkpoint: str
    steps: list[Step]
    state: Literal["running", "done", "failed"] = "running"
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Switcher:
    """Runs one rollout at a time over the pool's workers; the latest one stays readable."""

    def __init__(self, pool: BackendPool, router: ModelRouter, admin: Admin, registry: Registry,
                 session: aiohttp.ClientSession, admin_token: str | None, load_timeout: float) -> None:
        self._pool, self._router, self._admin, self.registry = pool, router, admin, registry
        self._session = session
        self._headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._load_timeout = load_timeout
        self.latest: Rollout | None = None
        self.task: asyncio.Task[None] | None = None
        self._count = 0

    @property
    def running(self) -> bool:
        return self.latest is not None and self.latest.state == "running"

    def start(self, checkpoint: Checkpoint, backends: list[Backend]) -> Rollout:
        if self.running:
            assert self.latest is not None
            raise SwitchInProgress(f"A switch to '{self.latest.checkpoint}' is still running; wait for it "
                                   "(GET /models/active) before starting another.")
        self._count += 1
        steps = [Step(b.index, b.url, sorted(b.models)) for b in backends]
        rollout = Rollout(self._count, checkpoint.id, steps)
        self.latest = rollout
        self._retire_names(checkpoint.id, backends)
        self.task = asyncio.create_task(self._run(rollout, checkpoint), name=f"rollout-{rollout.id}")
        return rollout

    def _retire_names(self, target: str, backends: list[Backend]) -> None:
        """Names served only by the switching workers follow the new checkpoint once none has them."""
        switching = {b.index for b in backends}
        others = [b for b in self._pool.backends if b.index not in switching and not b.removed]
        for name in {m for b in backends for m in b.models} - {target}:
            if not any(name in b.models for b in others):
                self.registry.set_redirect(name, target)
        self._router.set_redirects(self.registry.redirects())

    async def _run(self, rollout: Rollout, checkpoint: Checkpoint) -> None:
        try:
            for step in rollout.steps:
                if await self._switch(step, checkpoint):
                    continue
                rollout.state, rollout.error = "failed", f"worker {step.index}: {step.error}"
                for later in rollout.steps:
                    if later.state == "pending":
                        later.state = "skipped"
                self._unretire(rollout)
                return
            rollout.state = "done"
        except Exception as exc:  # the task's outer edge: a bug must not leave workers drained silently
            log.exception("rollout %d failed", rollout.id)
            rollout.state, rollout.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            rollout.finished_at = time.time()
            log.info("rollout %d to %s %s%s", rollout.id, checkpoint.id, rollout.state,
                     f": {rollout.error}" if rollout.error else "")

    async def _switch(self, step: Step, checkpoint: Checkpoint) -> bool:
        backend = self._pool.get(step.index)
        if backend is None:
            step.state, step.error = "failed", "the worker was removed"
            return False
        started = time.monotonic()
        step.state = "draining"
        step.drained = await self._admin.drain(backend)
        step.state = "loading"
        try:
            await self._load(backend, checkpoint)
        except SwitchFailed as exc:
            step.state, step.error = "failed", exc.message
        else:
            step.state = "done"
            backend.models = frozenset({checkpoint.id})
            backend.consecutive_failures = 0
            backend.healthy = True  # it answered /health with 200 and the new model just now
        finally:
            step.seconds = round(time.monotonic() - started, 3)
            backend.draining = False  # after a failure the health checks decide whether it is routable
            self._pool.changed()
        log.info("rollout: worker %d %s %s in %.1fs", step.index, step.state, checkpoint.id, step.seconds)
        return step.state == "done"

    async def _load(self, backend: Backend, checkpoint: Checkpoint) -> None:
        """POST /admin/load, then poll /health until the worker reports this load's outcome."""
        try:
            async with self._session.post(backend.url + "/admin/load", json=checkpoint.load_request(),
                                          headers=self._headers, timeout=ADMIN_TIMEOUT) as r:
                answer = await r.json(content_type=None)
                if r.status != 202:
                    raise SwitchFailed(f"POST /admin/load answered {r.status}: {_message(answer)}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise SwitchFailed(f"POST /admin/load failed: {type(exc).__name__}: {exc}") from None
        load_id = answer.get("id") if isinstance(answer, dict) else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._load_timeout
        while loop.time() < deadline:
            await asyncio.sleep(POLL)
            health = await self._health(backend)
            load = health.get("load") if isinstance(health, dict) else None
            if not isinstance(load, dict) or load.get("id") != load_id or load.get("state") == "loading":
                continue
            if load.get("state") == "failed":
                raise SwitchFailed(f"the worker could not load {checkpoint.id} and serves its old model "
                                   f"again: {load.get('error')}")
            if health.get("status") == "ok" and health.get("model") == checkpoint.id:
                return
        raise SwitchFailed(f"the worker did not report {checkpoint.id} loaded within {self._load_timeout:g}s")

    async def _health(self, backend: Backend) -> Any:
        try:
            async with self._session.get(backend.url + "/health", timeout=PROBE_TIMEOUT) as r:
                return await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None  # still loading, or busy: poll again

    def _unretire(self, rollout: Rollout) -> None:
        """After a failed switch, names some worker still serves need no redirect."""
        served = {m for b in self._pool.backends if not b.removed for m in b.models}
        for name in self.registry.redirects():
            if name in served:
                self.registry.drop_redirect(name)
        self._router.set_redirects(self.registry.redirects())


def _message(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("message"))
    return str(answer)[:300]
