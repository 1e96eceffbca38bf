"""SlurmJobConfig: every setting of `slurm/start_multi_gpu_slurm.sh`, once (flags, YAML, IB_SLURM_* env)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lb.settings import ConfigError, load_config, setting

ENGINES = ("hf", "dllm", "fake", "vllm", "sglang")
POLICIES = ("round_robin", "least_connections", "power_of_two")
ENV_PREFIX = "IB_SLURM_"
# node k's workers use worker_base_port + 100*k, so simulated nodes sharing one host never clash
NODE_PORT_STRIDE = 100


@dataclasses.dataclass(frozen=True)
class SlurmJobConfig:
    """One batch job: the allocation, what each node runs, and how the submitter waits for it."""

    gpus: int = setting(0, "total GPUs across all nodes, one worker per GPU", metavar="N")
    nodes: int | None = setting(None, "nodes to spread the GPUs over (default: gpus / gpus-per-node, or 1)",
                                metavar="N")
    gpus_per_node: int | None = setting(None, "GPUs per node (default: gpus / nodes)", metavar="N")
    cpu_workers: int = setting(0, "CPU workers per node instead of GPUs, for clusters without GPUs",
                               metavar="N")
    model_path: str | None = setting(None, "model directory every worker serves; must be readable on every "
                                           "node (not needed with --engine fake)", metavar="DIR")
    engine: str = setting("hf", "what each worker runs (see python -m scripts.launch --help)",
                          choices=ENGINES)
    engine_args: str = setting("", "extra worker arguments, shell-quoted", metavar="ARGS")
    gguf_file: str | None = setting(None, "our worker: load this GGUF file inside --model-path",
                                    metavar="FILE")
    trust_remote_code: bool = setting(False, "run the model code a model directory ships")
    attn_implementation: str | None = setting(None, "our worker's attention kernel: auto, sdpa, eager or "
                                                    "flash_attention_2", metavar="NAME")
    quantization: str | None = setting(None, "our worker: none, 8bit or 4bit (bitsandbytes)", metavar="MODE")
    dcp_path: str | None = setting(None, "our worker: a torch.distributed.checkpoint directory loaded into "
                                         "--base-model's architecture (readable on every node)",
                                   metavar="DIR")
    base_model: str | None = setting(None, "with --dcp-path: the model directory giving architecture and "
                                           "tokenizer", metavar="DIR")
    batch_size: int = setting(16, "each worker's maximum batch", metavar="N")
    max_wait_time: float = setting(0.05, "each worker's batch gathering window", metavar="SECONDS")
    port: int = setting(9000, "balancer port on the first node")
    worker_base_port: int = setting(9001, f"port of node 0's first worker; node k starts at base + "
                                          f"{NODE_PORT_STRIDE}*k")
    policy: str = setting("least_connections", "balancer routing policy", choices=POLICIES)
    job_name: str = setting("inference-balancer", "SLURM job name", metavar="NAME")
    account: str | None = setting(None, "SLURM account to charge (sbatch --account)", metavar="A")
    partition: str | None = setting(None, "SLURM partition (sbatch --partition)", metavar="P")
    time: str | None = setting(None, "time limit (sbatch --time, e.g. 04:00:00); at the limit SLURM sends "
                                     "SIGTERM and the balancer drains", metavar="T")
    cpus_per_task: int | None = setting(None, "CPUs for each node task (sbatch --cpus-per-task)", metavar="N")
    sbatch_arg: tuple[str, ...] = setting((), "extra sbatch option, e.g. --sbatch-arg=--exclusive "
                                              "(repeatable)", metavar="OPT")
    container_image: str | None = setting(
        None, "run the balancer and node tasks in this image through pyxis (srun --container-image); the "
              "image must have --python and this checkout at the same paths (see slurm/README.md)",
        metavar="IMG")
    container_mounts: str | None = setting(
        None, "srun --container-mounts value (default: the checkout and --output-dir at the same paths)",
        metavar="SRC:DST[,...]")
    python: str | None = setting(None, "python of the environment the job runs (default: the python running "
                                       "this script); must exist at this path on every node", metavar="PATH")
    output_dir: str = setting("slurm_jobs", "shared directory for the job: slurm-<id>.out and <id>/ with "
                                            "logs, connection.json and the admin token", metavar="DIR")
    node_addr: str | None = setting(
        None, "address the balancer and workers are reached at (default: each node's own address from "
              "`hostname -i`); 127.0.0.1 only when every node is this one host", metavar="ADDR")
    login_host: str | None = setting(None, "host in the printed ssh tunnel command (default: the submit "
                                           "host)", metavar="HOST")
    local_port: int = setting(8000, "your laptop's port in the printed ssh tunnel command")
    ready_timeout: float = setting(900.0, "seconds the job waits for every worker to join before it reports "
                                          "itself degraded", metavar="SECONDS")
    wait: bool = setting(False, "after submitting, wait until the balancer is ready and print how to connect")
    wait_timeout: float = setting(3600.0, "seconds --wait waits (queueing included)", metavar="SECONDS")
    dry_run: bool = setting(False, "print the sbatch command and the job's environment, submit nothing")

    def __post_init__(self) -> None:
        for name in ("gpus", "cpu_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")
        for name in ("nodes", "gpus_per_node", "cpus_per_task", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")
        if self.gpus and self.cpu_workers:
            raise ConfigError("cpu_workers: choose either --gpus or --cpu-workers")
        if not self.gpus and not self.cpu_workers:
            raise ConfigError("gpus: give --gpus N (or --cpu-workers N on a cluster without GPUs)")
        if self.cpu_workers and self.gpus_per_node:
            raise ConfigError("gpus_per_node: not used with --cpu-workers")
        if self.gpus:
            nodes, per_node = self.nodes, self.gpus_per_node
            if per_node and self.gpus % per_node:
                raise ConfigError(f"gpus_per_node: {self.gpus} GPUs do not split into nodes of {per_node}")
            if nodes and self.gpus % nodes:
                raise ConfigError(f"nodes: {self.gpus} GPUs do not split evenly over {nodes} nodes")
            if nodes and per_node and nodes * per_node != self.gpus:
                raise ConfigError(f"nodes: {nodes} nodes x {per_node} GPUs is not --gpus {self.gpus}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.engine != "fake" and not self.model_path and not (self.engine == "hf" and self.dcp_path):
            raise ConfigError("model_path: required (e.g. --model-path DIR), unless --engine fake")
        for name in ("port", "worker_base_port", "local_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name}: not a TCP port: {getattr(self, name)}")
        last_port = self.worker_base_port + NODE_PORT_STRIDE * (self.node_count - 1) + self.workers_per_node
        if last_port > 65535:
            raise ConfigError(f"worker_base_port: node ports would run past 65535 (to {last_port})")
        if self.worker_base_port <= self.port < self.worker_base_port + self.workers_per_node:
            raise ConfigError(f"port: {self.port} falls among node 0's worker ports")
        for name in ("max_wait_time",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative")
        for name in ("ready_timeout", "wait_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")

    @property
    def node_count(self) -> int:
        if self.nodes:
            return self.nodes
        if self.gpus and self.gpus_per_node:
            return self.gpus // self.gpus_per_node
        return 1

    @property
    def gpus_on_each_node(self) -> int:
        """GPUs requested per node (sbatch --gres=gpu:N); 0 for CPU workers."""
        return self.gpus // self.node_count if self.gpus else 0

    @property
    def workers_per_node(self) -> int:
        return self.cpu_workers or self.gpus_on_each_node

    @property
    def expected_workers(self) -> int:
        return self.workers_per_node * self.node_count

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()


# SLURM's own conventions, read when no flag, YAML key or IB_SLURM_* variable sets the value: sbatch's
# input variables first, then the plain ACCOUNT that cluster guides ask users to export
CONVENTION_ENV = {"account": ("SBATCH_ACCOUNT", "ACCOUNT"), "partition": ("SBATCH_PARTITION",)}


def load(argv: list[str] | None = None, environ: Mapping[str, str] | None = None,
         sources: dict[str, str] | None = None) -> SlurmJobConfig:
    """The job's settings; `sources` (when given) says where each set value came from."""
    env = os.environ if environ is None else environ
    origin: dict[str, str] = {} if sources is None else sources
    cfg = _load(argv, env, origin)
    for name, variables in CONVENTION_ENV.items():
        if name in origin:
            continue
        for variable in variables:
            if env.get(variable):
                changes: dict[str, Any] = {name: env[variable]}
                cfg = dataclasses.replace(cfg, **changes)
                origin[name] = f"environment {variable}"
                break
    return cfg


def _load(argv: list[str] | None, environ: Mapping[str, str], sources: dict[str, str]) -> SlurmJobConfig:
    return load_config(
        SlurmJobConfig, argv, prog="slurm/start_multi_gpu_slurm.sh", env_prefix=ENV_PREFIX,
        environ=environ, sources=sources,
        description=(
            "Submit one SLURM batch job that serves a model behind the balancer: one node task per node\n"
            "starts a worker per GPU SLURM allocated there (or --cpu-workers N), the balancer runs on the\n"
            "first node and every worker registers with it. When ready the job writes\n"
            "<output-dir>/<job id>/connection.json and prints the ssh tunnel command; --wait waits for that\n"
            "here and prints it with an OpenAI SDK example. scancel (or the time limit) drains the balancer\n"
            "and stops every worker.\n\n"
            "  slurm/start_multi_gpu_slurm.sh --gpus 8 --nodes 2 --model-path /models/llama --wait\n\n"
            "Every flag is also a YAML key in --config and an environment variable\n"
            f"{ENV_PREFIX}<FLAG_NAME>. "
            "Without any of those, --account comes from SBATCH_ACCOUNT or ACCOUNT and --partition from\n"
            "SBATCH_PARTITION (SLURM's conventions); --dry-run shows where each value came from."
        ),
    )
