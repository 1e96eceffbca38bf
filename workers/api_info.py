"""GET /version (software versions) and GET /info (what this worker runs, and how), without secrets.

Neither imports torch: a version is read from the installed distribution's metadata, and CUDA's only from an
already imported torch (the hf engine imports it; the fake engine needs none).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web

from workers.gpu import cuda_visible_devices
from workers.state import STATE

SECRET_SETTINGS = frozenset({"admin_token"})  # shown as "***" when set
PACKAGES = ("torch", "transformers", "tokenizers", "aiohttp", "accelerate", "gguf")


@cache
def api_version() -> str:
    """This project's version, from the checkout's pyproject.toml (the code runs in place)."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return _installed("inference-balancer") or "unknown"


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    body: dict[str, Any] = {"api": api_version(), "python": platform.python_version()}
    body |= {name: _installed(name) for name in PACKAGES}
    body["cuda"] = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    return body


def public_config(config: Any) -> dict[str, Any]:
    """Every setting by name, secrets masked."""
    values = dataclasses.asdict(config)
    for key in SECRET_SETTINGS & values.keys():
        if values[key] is not None:
            values[key] = "***"
    return values


async def version(request: web.Request) -> web.Response:
    return web.json_response(versions())


async def info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    loaded = state.status in ("ok", "draining")
    engine = state.engine.info if loaded else None
    body = {
        "status": state.status,
        "model": engine.model if engine else state.config.model_name,
        "engine": engine.engine if engine else state.config.engine,
        "device": engine.device if engine else state.config.device,
        "max_model_len": engine.max_model_len if engine else None,
        "pid": state.pid,
        "started_at": state.started_at,
        "cuda_visible_devices": cuda_visible_devices(),
        "config": public_config(state.config),
        "load": state.load.as_dict() if state.load else None,
        "versions": versions(),
    }
    return web.json_response(body)
