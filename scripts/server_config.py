"""`create_server(backend, model, ...)`, `load_server_config(path)` and `start_server_from_config(path)`.

The YAML is the seed's inference-server format, one server per file:

    backend: vllm                  # vllm | sglang | hf | dllm | fake (our worker)
    model: /models/llama
    port: 8000
    output_dir: ./logs
    env_vars: {VLLM_CPU_KVCACHE_SPACE: 1}
    config:
      api_server_args: {max_model_len: 1024, enforce_eager: true}   # or a list, or a list with mappings
    profile: {enabled: false, tool: nsys, output_dir: ./profiles, args: [--trace, cuda]}
    heartbeat_interval: 10         # also: host, heartbeat_timeout, startup_timeout, stop_timeout,
    debug_mode: false              #       python (the interpreter of vLLM's / SGLang's environment)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lb.settings import ConfigError, read_yaml
from scripts.server import InferenceServer
from scripts.server_backends import SGLangServer, VLLMServer, WorkerServer

SERVERS: dict[str, type[InferenceServer]] = {"vllm": VLLMServer, "sglang": SGLangServer}
WORKER_ENGINES = WorkerServer.ENGINES  # our worker, one engine each: hf | dllm | fake
BACKENDS = (*SERVERS, *WORKER_ENGINES)
# YAML keys passed to the server as they are (the rest: backend, model)
SERVER_KEYS = ("port", "host", "output_dir", "heartbeat_interval", "heartbeat_timeout", "startup_timeout",
               "stop_timeout", "env_vars", "config", "profile", "debug_mode", "python", "name")


def create_server(backend: str, model: str | Path | None = None, **kwargs: Any) -> InferenceServer:
    """A server for `backend` (not started): `create_server("vllm", "/models/llama", port=8001)`."""
    if backend in SERVERS:
        return SERVERS[backend](model, **kwargs)
    if backend in WORKER_ENGINES:
        return WorkerServer(model, engine=backend, **kwargs)
    raise ConfigError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)} (for a server of your own, "
                      "subclass scripts.server.InferenceServer)")


def load_server_config(path: str | Path) -> dict[str, Any]:
    """The YAML's settings as `create_server` keywords (`backend` and `model` included); unknown keys fail."""
    data = read_yaml(path)
    return server_settings(data, f"config file {path}")


def server_settings(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(map(str, data)) - {"backend", "model", *SERVER_KEYS})
    if unknown:
        known = ", ".join(sorted({"backend", "model", *SERVER_KEYS}))
        raise ConfigError(f"unknown key {unknown[0]} in {source}; known keys: {known}")
    if "backend" not in data:
        raise ConfigError(f"backend: required in {source} (one of {', '.join(BACKENDS)})")
    for key in ("env_vars", "config", "profile"):
        if data.get(key) is not None and not isinstance(data[key], Mapping):
            raise ConfigError(f"{key} in {source}: expected a mapping, got {data[key]!r}")
    return dict(data)


def server_from_config(path: str | Path, **overrides: Any) -> InferenceServer:
    settings = {**load_server_config(path), **overrides}
    backend = str(settings.pop("backend"))
    return create_server(backend, settings.pop("model", None), **settings)


def start_server_from_config(path: str | Path, **overrides: Any) -> InferenceServer:
    """Create the server the YAML describes and start it (use it as a context manager or call stop())."""
    return server_from_config(path, **overrides).start()
