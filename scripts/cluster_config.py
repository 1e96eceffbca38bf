"""The launcher's settings: one frozen `ClusterConfig`, filled from flags, env (`IB_CLUSTER_*`) or YAML.

The YAML may use our flat keys (the flag names with underscores) and/or the seed inference-server format,
translated by `scripts.seed_yaml`: `backend`, `model`, `port`, `output_dir`, `env_vars`,
`config.api_server_args` / `config.server_args`, `profile: {enabled, tool, output_dir, args}`, `batching`.
"""

from __future__ import annotations

import json
import shlex
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lb.settings import (
    ConfigError,
    coerce_mapping,
    from_mapping,
    load_config,
    read_yaml,
)
from lb.settings import setting as s
from scripts.profilers import PROFILE_TOOLS
from scripts.seed_yaml import translate

ENGINES = ("hf", "dllm", "fake", "vllm", "sglang")
POLICIES = ("round_robin", "least_connections", "power_of_two")
ENV_PREFIX = "IB_CLUSTER_"
DEFAULT_RUN_DIR = "~/.cache/inference-balancer/run"


def parse_env_vars(key: str, value: Any) -> Mapping[str, str]:
    """A mapping from YAML, or from a flag: a JSON object or whitespace-separated KEY=VALUE words."""
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: not a JSON object: {exc}") from None
        else:
            items = {}
            for word in shlex.split(text):
                name, sep, val = word.partition("=")
                if not sep or not name:
                    raise ConfigError(f"{key}: expected KEY=VALUE, got {word!r}")
                items[name] = val
    else:
        raise ConfigError(f"{key}: expected a mapping of environment variables, got {value!r}")
    out: dict[str, str] = {}
    for name, val in items.items():
        if not isinstance(name, str) or not name or "=" in name:
            raise ConfigError(f"{key}: bad variable name {name!r}")
        if isinstance(val, dict | list):
            raise ConfigError(f"{key}.{name}: a value must be a string or number, got {val!r}")
        out[name] = "" if val is None else (str(val).lower() if isinstance(val, bool) else str(val))
    return types.MappingProxyType(out)


@dataclass(frozen=True)
class ClusterConfig:
    """Everything `python -m scripts.launch` and `LocalCluster` need to start workers and the balancer."""

    model_path: str | None = s(None, "model directory (or hub name for vllm/sglang) every worker serves",
                               metavar="DIR")
    served_model_name: str | None = s(None, "model name clients send (default: the worker's own choice)",
                                      metavar="NAME")
    gpus: int | None = s(None, "number of GPUs to use, one worker each (default: every visible GPU)",
                         metavar="N")
    gpu_ids: str | None = s(None, "GPU ids to use, CUDA_VISIBLE_DEVICES style, e.g. 0,2,4,6", metavar="IDS")
    gpus_per_worker: int = s(1, "GPUs given to each worker (e.g. 2 for vLLM tensor parallel)", metavar="N")
    cpu_workers: int | None = s(None, "run N CPU workers instead of GPU workers (CUDA_VISIBLE_DEVICES='')",
                                metavar="N")
    engine: str = s("hf", "what each worker runs: our worker (hf, dllm, fake) or vLLM's / SGLang's own "
                    "server",
                    choices=ENGINES)
    engine_args: str = s("", "extra worker arguments, shell-quoted; use --engine-args='--flag' or put them "
                             "after a bare `--`", metavar="ARGS")
    worker_cmd: str | None = s(None, "run any server instead: a template with {port} {gpu} {model} {host} "
                                     "{index}, e.g. 'my-server --port {port}'", metavar="TEMPLATE")
    health_path: str = s("/health", "path the launcher probes on each worker to see it is ready")
    vllm_python: str | None = s(None, "python of the virtual environment that has vLLM (--engine vllm)",
                                metavar="PATH")
    sglang_python: str | None = s(None, "python of the virtual environment that has SGLang", metavar="PATH")
    batch_size: int | None = s(None, "our worker's maximum batch (default: the worker's own, 8)", metavar="N")
    max_wait_time: float | None = s(None, "our worker's batch gathering window in seconds (worker default "
                                          "0.05)", metavar="S")
    gguf_file: str | None = s(None, "our worker: load this GGUF file inside --model-path", metavar="FILE")
    trust_remote_code: bool = s(False, "run the model code a model directory ships (our worker, vLLM, "
                                       "SGLang)")
    attn_implementation: str | None = s(None, "our worker's attention kernel: auto, sdpa, eager or "
                                              "flash_attention_2 (CUDA)", metavar="NAME")
    quantization: str | None = s(None, "our worker: none, 8bit or 4bit (bitsandbytes, CUDA only)",
                                 metavar="MODE")
    dcp_path: str | None = s(None, "our worker: a torch.distributed.checkpoint directory loaded into "
                                   "--base-model's architecture", metavar="DIR")
    base_model: str | None = s(None, "with --dcp-path: the model directory giving architecture and tokenizer",
                               metavar="DIR")
    host: str = s("127.0.0.1", "address the balancer binds (0.0.0.0 to serve other machines)")
    port: int = s(8000, "balancer port; if taken, the next free one is used and reported")
    worker_host: str = s("127.0.0.1", "address workers bind; also the host in worker URLs (a wildcard "
                                      "address is replaced by this machine's hostname)")
    worker_base_port: int = s(8001, "port of worker 0; worker i tries base+i, skipping taken ports")
    skip_ports: tuple[str, ...] = s((), "ports never to use, e.g. 5003,5004 (repeatable)", metavar="PORTS")
    policy: str | None = s(None, "balancer routing policy (default: the balancer's own)", choices=POLICIES)
    api_key: str | None = s(None, "key clients must send to the balancer (Authorization: Bearer KEY)",
                            metavar="KEY")
    api_key_file: str | None = s(None, "file whose first line is the client key (keeps it off the command "
                                       "line; IB_CLUSTER_API_KEY works too)", metavar="FILE")
    admin_token: str | None = s(None, "token for the balancer's admin API (also sent with --register-with); "
                                      "default: a fresh random token in RUN_DIR/admin-token",
                                metavar="TOKEN")
    lb_args: str = s("", "extra balancer flags, shell-quoted, e.g. --lb-args='--max-retries 3'",
                     metavar="ARGS")
    health_check_interval: float = s(2.0, "seconds between health probes (the balancer's and the "
                                          "launcher's heartbeat)", metavar="S")
    workers_only: bool = s(False, "start and supervise workers only, no balancer (SLURM node tasks)")
    register_with: str | None = s(None, "balancer URL to POST each healthy worker to (/workers)",
                                  metavar="URL")
    log_dir: str = s("logs", "one log file per worker and one for the balancer go here", metavar="DIR")
    run_dir: str = s(DEFAULT_RUN_DIR, "where cluster.json (pids, ports, GPUs) is kept for status/stop",
                     metavar="DIR")
    env_vars: Mapping[str, str] | None = s(None, "extra environment for every worker: "
                                    "'KEY=VALUE KEY2=VALUE2' or a JSON object", metavar="VARS")
    startup_timeout: float = s(600.0, "seconds for every worker (then the balancer) to pass its health "
                                      "check before the launch fails", metavar="S")
    restart: bool = s(True, "restart a worker that crashes after start-up, with exponential backoff")
    max_restarts: int = s(10, "give up restarting a worker after this many restarts", metavar="N")
    restart_backoff_max: float = s(30.0, "longest wait in seconds before a restart (backoff 1, 2, 4, ...)",
                                   metavar="S")
    stop_timeout: float = s(30.0, "seconds each process group gets to exit after SIGTERM (the balancer "
                                  "drains in it) before SIGKILL", metavar="S")
    profile_enabled: bool = s(False, "run workers under a profiler (profile.enabled in YAML)")
    profile_tool: str = s("nsys", "profiler: nsys (Nsight Systems) or amd (rocprof) prefixes the command; "
                                  "pytorch sets the engine's torch profiler directory", choices=PROFILE_TOOLS)
    profile_output_dir: str = s("profiles", "where profiles are written", metavar="DIR")
    profile_args: str = s("", "extra profiler arguments, shell-quoted (nsys and amd)", metavar="ARGS")

    def __post_init__(self) -> None:
        object.__setattr__(self, "env_vars", parse_env_vars("env_vars", self.env_vars or {}))
        for name, allowed in (("engine", ENGINES), ("policy", POLICIES), ("profile_tool", PROFILE_TOOLS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
        chosen = [f for f in ("gpus", "gpu_ids", "cpu_workers") if getattr(self, f) is not None]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)}: choose one of gpus, gpu_ids, cpu_workers")
        for name in ("gpus", "cpu_workers", "gpus_per_worker", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")
        for name in ("port", "worker_base_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name}: not a TCP port: {getattr(self, name)}")
        for name in ("startup_timeout", "health_check_interval", "stop_timeout", "restart_backoff_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.max_wait_time is not None and self.max_wait_time < 0:
            raise ConfigError(f"max_wait_time: must not be negative, got {self.max_wait_time}")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts: must not be negative, got {self.max_restarts}")
        for port in self.skip_port_numbers:
            if not 1 <= port <= 65535:
                raise ConfigError(f"skip_ports: not a TCP port: {port}")
        dcp_only = self.engine == "hf" and self.dcp_path is not None  # its --base-model names the model
        if self.model_path is None and self.engine != "fake" and self.worker_cmd is None and not dcp_only:
            raise ConfigError("model_path: required (e.g. --model-path DIR)")
        if self.api_key is not None and self.api_key_file is not None:
            raise ConfigError("api_key_file: give either api_key or api_key_file, not both")
        if not self.health_path.startswith("/"):
            raise ConfigError(f"health_path: must start with '/', got {self.health_path!r}")
        for name in ("engine_args", "lb_args", "profile_args", "worker_cmd"):
            try:
                shlex.split(getattr(self, name) or "")
            except ValueError as exc:
                raise ConfigError(f"{name}: cannot split into words: {exc}") from None

    @property
    def skip_port_numbers(self) -> frozenset[int]:
        try:
            return frozenset(int(p) for p in self.skip_ports)
        except ValueError as exc:
            raise ConfigError(f"skip_ports: {exc}") from None

    @property
    def engine_arg_list(self) -> list[str]:
        return shlex.split(self.engine_args)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ClusterConfig:
        """A YAML file (flat keys or the seed format), then keyword overrides (field names)."""
        values = coerce_mapping(cls, translate(read_yaml(path), f"config file {path}"), f"config file {path}")
        values.update(coerce_mapping(cls, overrides, "arguments"))
        return from_mapping(cls, values)


DESCRIPTION = """\
Start one worker per GPU (or N CPU workers) and the load balancer in front of them, supervise them, and stop
everything on Ctrl-C / SIGTERM. Examples:
  start_multi_gpu_server.sh --model-path DIR --gpus 4
  start_multi_gpu_server.sh --model-path DIR --cpu-workers 2 --engine hf --batch-size 8
  start_multi_gpu_server.sh --model-path DIR --engine vllm --vllm-python /venv/bin/python -- --enforce-eager
  start_multi_gpu_server.sh --config cluster.yaml --port 9000
Every flag can also be given as a YAML key (--config, flag name with underscores) or an environment variable
IB_CLUSTER_<FLAG_NAME>. Words after a bare `--` are appended to --engine-args.
CPU workers get CUDA_VISIBLE_DEVICES set to the empty string, so they never touch a GPU.
"""


def load_cluster_config(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None,
                        prog: str = "start_multi_gpu_server.sh") -> ClusterConfig:
    """Parse the launcher's command line (exits with usage on --help or a bad flag); YAML may be the seed's
    format, and words after a bare `--` are appended to the engine arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, extra = args[:cut], args[cut + 1:]
    cfg = load_config(ClusterConfig, args, prog=prog, description=DESCRIPTION, env_prefix=ENV_PREFIX,
                      environ=environ, translate_yaml=translate)
    if extra:
        cfg = replace(cfg, engine_args=" ".join(filter(None, [cfg.engine_args, shlex.join(extra)])))
    return cfg
