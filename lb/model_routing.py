"""Model-aware routing: narrow the candidates to the backends serving a request's `model`.

Matching is exact first, then normalised the way the seed's multi-server router did: case-insensitive, without
an `org/` prefix and without an `-it` / `-instruct` suffix, so `Qwen/Qwen2.5-0.5B-Instruct` reaches a worker
serving `qwen2.5-0.5b` (the body's `model` is then rewritten to the worker's own name). When every backend
serves the same models, routing ignores the body entirely. A name that a rolling switch retired from every
worker follows its replacement (`redirects`, kept by the checkpoint registry), and is then rewritten to it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lb.backends import Backend, BackendPool
from lb.errors import ModelNotFound

SUFFIXES = ("-instruct", "-it")


def served_name(backend: Backend, model: str) -> str:
    """The name `backend` itself serves for `model` (workers reject names they do not know exactly)."""
    if model in backend.models or not backend.models:
        return model
    wanted = normalise(model)
    # no normalised match: the backend was chosen through a redirect, so its one model is the replacement
    sole = next(iter(backend.models)) if len(backend.models) == 1 else model
    return next((m for m in sorted(backend.models) if normalise(m) == wanted), sole)


def rewrite_model(body: bytes, name: str) -> bytes:
    """The request body with its `model` replaced; only for requests matched by normalised name."""
    payload = json.loads(body)
    payload["model"] = name
    return json.dumps(payload).encode()


def normalise(name: str) -> str:
    """`Org/Model-Name-Instruct` -> `model-name`."""
    name = name.strip().lower().rsplit("/", 1)[-1]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class ModelRouter:
    """Answers "does routing need the body?" and "which backends serve this model?" from the pool's state."""

    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool
        self.needs_model = False
        self._cache: dict[str, list[Backend]] = {}  # model name as sent -> routable backends serving it
        self.redirects: dict[str, str] = {}  # retired model name -> the checkpoint that replaced it
        pool.on_change(self.refresh)
        self.refresh()

    def refresh(self) -> None:
        """Health, models or membership changed: per-model candidate lists are rebuilt lazily."""
        model_sets = {b.models for b in self._pool.backends if not b.removed}
        # one distinct model set (or none known) means any backend will do: forward the body unread, unless
        # a retired name must be rewritten to its replacement
        self.needs_model = len(model_sets) > 1 or bool(self.redirects)
        self._cache.clear()

    def set_redirects(self, redirects: dict[str, str]) -> None:
        self.redirects = dict(redirects)
        self.refresh()

    def candidates(self, model: str | None, backends: Sequence[Backend]) -> Sequence[Backend]:
        """The routable backends serving `model`; all of them when `model` is absent or routing is moot.

        An empty result means the model is known but no backend serving it is healthy right now (the caller
        answers 503). A model no backend has ever served raises ModelNotFound listing the available ones.
        """
        if model is None or not self.needs_model:
            return backends
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        everyone = [b for b in self._pool.backends if not b.removed]
        serving = _serving(model, everyone)
        known = bool(serving)
        result = [b for b in backends if b in serving]
        name, seen = model, {model}
        # nobody routable serves it: follow what replaced it (a switch in progress, or one that retired it)
        while not result and self.redirects.get(name) not in (None, *seen):
            name = self.redirects[name]
            seen.add(name)
            serving = _serving(name, everyone)
            known = known or bool(serving)
            result = [b for b in backends if b in serving]
        if not known:
            available = sorted({m for b in everyone for m in b.models})
            raise ModelNotFound(
                f"The model '{model}' does not exist on this balancer. Available models: "
                + (", ".join(available) or "(none)")
            )
        self._cache[model] = result
        return result


def _serving(model: str, backends: Sequence[Backend]) -> list[Backend]:
    """The backends serving `model` by exact name, else by normalised name."""
    serving = [b for b in backends if model in b.models]
    if not serving:
        wanted = normalise(model)
        serving = [b for b in backends if any(normalise(m) == wanted for m in b.models)]
    return serving
