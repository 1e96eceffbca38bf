"""The worker's settings: one frozen dataclass filled from CLI flags, YAML and `IB_WORKER_*` variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lb.settings import ConfigError, load_config, setting

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
QUANTIZATIONS = ("none", "8bit", "4bit")

ENGINES = ("hf", "dllm", "fake")
DLLM_ALGORITHMS = ("low_confidence", "random", "threshold")  # = engines.base.DIFFUSION_ALGORITHMS (tested)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_PREFIX = "IB_WORKER_"
FAKE_MODEL_NAME = "fake-model"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs; every default is declared here and nowhere else."""

    model_path: str | None = setting(
        None, "model directory (save_pretrained layout); required for --engine hf", metavar="DIR"
    )
    served_model_name: str | None = setting(
        None, "model name clients send and /v1/models lists (default: the model directory's name, "
        "or 'fake-model' for the fake engine)", metavar="NAME"
    )
    host: str = setting("127.0.0.1", "address to bind; 0.0.0.0 exposes the worker to the network")
    port: int = setting(8001, "TCP port to listen on")
    engine: str = setting(
        "hf", "hf = transformers on the model in --model-path; dllm = a masked-diffusion LM (LLaDA-style) in "
        "--model-path; fake = deterministic text with a latency model imitating a batching GPU, needs no "
        "files (for testing the balancer)", choices=ENGINES
    )
    device: str = setting("auto", "where the hf engine runs; auto = cuda when available", choices=DEVICES)
    dtype: str = setting(
        "auto", "weights dtype of the hf engine; auto = float32 on CPU, bfloat16 (float16 if unsupported) "
        "on CUDA", choices=DTYPES
    )
    batch_size: int = setting(8, "most sequences generated together in one batch")
    max_wait_time: float = setting(
        0.05, "seconds the batcher waits, after a request arrives at an idle engine, for more to fill a batch"
    )
    max_model_len: int | None = setting(
        None, "context length in tokens (prompt + generated); default: the model's own (4096 for fake)"
    )
    max_queue: int = setting(
        256, "requests that may wait for a batch slot; beyond it new requests get 429 with Retry-After"
    )
    drain_timeout: float = setting(
        30.0, "seconds after SIGTERM that running requests may take to finish before they are cut off"
    )
    log_level: str = setting("info", "logging level; debug also logs every HTTP request", choices=LOG_LEVELS)
    gguf_file: str | None = setting(
        None, "hf engine: load this GGUF file inside --model-path (dequantised by transformers; needs the "
        "gguf and accelerate packages)", metavar="FILE"
    )
    attn_implementation: str = setting(
        "auto", "hf engine: attention kernel; auto = the model's default (sdpa where supported); "
        "flash_attention_2 needs CUDA and the flash-attn package", choices=ATTN_IMPLEMENTATIONS
    )
    quantization: str = setting(
        "none", "hf engine: load the weights quantised with bitsandbytes (CUDA only)", choices=QUANTIZATIONS
    )
    dcp_path: str | None = setting(
        None, "hf engine: a torch.distributed.checkpoint directory whose tensors replace --base-model's "
        "weights (as training frameworks save them); --model-path is then optional", metavar="DIR"
    )
    base_model: str | None = setting(
        None, "hf engine: with --dcp-path, the save_pretrained directory giving architecture and tokenizer",
        metavar="DIR"
    )
    admin_token: str | None = setting(
        None, "bearer token for POST /admin/load (swap the model in place); without it only loopback clients "
        "may call it", metavar="TOKEN"
    )
    trust_remote_code: bool = setting(
        False, "hf and dllm engines: run the model code a model directory ships (config.json auto_map), as "
        "LLaDA checkpoints need; off by default"
    )
    fake_load_latency: float = setting(
        0.0, "fake engine: seconds its load() takes (to exercise the 503 'loading' state)"
    )
    fake_prefill_latency: float = setting(
        0.0, "fake engine: seconds charged once per batch (and per admitted group) for the prefill"
    )
    fake_step_latency: float = setting(0.0, "fake engine: seconds per decode step, whatever the batch size")
    fake_per_seq_latency: float = setting(
        0.0, "fake engine: extra seconds per decode step for each running sequence"
    )
    mask_token_id: int | None = setting(
        None, "dllm engine: the mask token's id (default: config.json mask_token_id, else the tokenizer's "
        "mask token)"
    )
    dllm_gen_length: int = setting(
        64, "dllm engine: tokens generated when a request names no max_tokens (a request's max_tokens, or "
        "its gen_length field, sets its own)"
    )
    dllm_block_length: int = setting(
        32, "dllm engine: tokens per block (blocks are generated left to right); a request's length that it "
        "does not divide uses its largest divisor below this; request field block_length"
    )
    dllm_steps: int | None = setting(
        None, "dllm engine: denoising steps per request, shared over its blocks (default: one per generated "
        "token); request field steps"
    )
    dllm_algorithm: str = setting(
        "low_confidence", "dllm engine: what a step commits: low_confidence = the most probable predictions, "
        "as many as the linear schedule says; random = random positions, as many; threshold = every "
        "prediction above --dllm-threshold, at least one; request field algorithm", choices=DLLM_ALGORITHMS
    )
    dllm_threshold: float = setting(
        0.9, "dllm engine: probability above which the threshold algorithm commits a prediction; request "
        "field threshold"
    )
    dllm_cfg_scale: float = setting(
        0.0, "dllm engine: classifier-free guidance scale (0 = off; > 0 runs each row twice per step, once "
        "with its prompt masked); request field cfg_scale"
    )

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        dcp_only = self.engine == "hf" and self.dcp_path  # the base model gives architecture and tokenizer
        if self.engine in ("hf", "dllm") and not self.model_path and not dcp_only:
            raise ConfigError(f"model_path: required with --engine {self.engine} (or use --engine fake)")
        if self.dcp_path and not self.base_model:
            raise ConfigError("base_model: required with --dcp-path (the directory the checkpoint fits)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: must be 1-65535, got {self.port}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {self.batch_size}")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue: must be at least 1, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len: must be at least 2, got {self.max_model_len}")
        for name in ("dllm_gen_length", "dllm_block_length", "dllm_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dllm_threshold <= 1.0:
            raise ConfigError(f"dllm_threshold: must be between 0 and 1, got {self.dllm_threshold}")
        for name in ("max_wait_time", "drain_timeout", "fake_load_latency", "fake_prefill_latency",
                     "fake_step_latency", "fake_per_seq_latency", "dllm_cfg_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)}")

    @property
    def model_name(self) -> str:
        """The name this worker serves under."""
        if self.served_model_name:
            return self.served_model_name
        if self.model_path:
            return Path(self.model_path).resolve().name
        if self.dcp_path:
            return Path(self.dcp_path).resolve().name
        return FAKE_MODEL_NAME


def load_worker_config(argv: list[str] | None = None) -> WorkerConfig:
    """Parse the worker's command line (exits with usage on --help or a bad flag)."""
    return load_config(
        WorkerConfig,
        argv,
        prog="python -m workers",
        description=(
            "One OpenAI-compatible inference worker (one per GPU): /v1/completions, /v1/chat/completions,\n"
            "/generate, /health, /v1/models, /metrics. Concurrent requests are batched dynamically.\n"
            f"Every flag is also a YAML key in --config and an environment variable {ENV_PREFIX}<FLAG_NAME>."
        ),
        env_prefix=ENV_PREFIX,
    )
