"""Profilers a server runs under (`profile: {enabled, tool, output_dir, args}`): clusters and single servers.

`nsys` (NVIDIA Nsight Systems) and `amd` (ROCm's `rocprof`) prefix the server's command; `pytorch` sets the
engine's own torch-profiler directory (vLLM and SGLang expose /start_profile). A missing tool is a
`ConfigError` raised while commands are built, before any process starts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lb.settings import ConfigError

PROFILE_TOOLS = ("nsys", "pytorch", "amd")
# the binary each prefixing tool needs, and how to install it when it is missing
PREFIX_BINARIES = {
    "nsys": ("nsys", "install NVIDIA Nsight Systems"),
    "amd": ("rocprof", "install ROCm's rocprofiler"),
}
# the environment variable that points an engine's torch profiler at a directory
PYTORCH_PROFILER_ENV = {"vllm": "VLLM_TORCH_PROFILER_DIR", "sglang": "SGLANG_TORCH_PROFILER_DIR"}


@dataclass(frozen=True)
class Profile:
    enabled: bool = False
    tool: str = "nsys"
    output_dir: str = "profiles"
    args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tool not in PROFILE_TOOLS:
            raise ConfigError(f"profile.tool: {self.tool!r} is not one of {', '.join(PROFILE_TOOLS)}")

    def output_for(self, name: str) -> Path:
        """Where the profile of server `name` (e.g. worker-0) goes."""
        return Path(self.output_dir).expanduser().resolve() / name

    def command_prefix(self, name: str) -> list[str]:
        """Words to put before the server's argv (empty unless a prefixing tool is enabled)."""
        if not self.enabled or self.tool not in PREFIX_BINARIES:
            return []
        binary, how = PREFIX_BINARIES[self.tool]
        path = shutil.which(binary)
        if path is None:
            raise ConfigError(f"profile.tool: {self.tool} is enabled but `{binary}` is not on PATH ({how}, "
                              "or set profile.enabled: false)")
        output = str(self.output_for(name))
        if self.tool == "nsys":
            return [path, "profile", "-o", output, *self.args]
        return [path, "-d", output, *self.args]  # rocprof writes its results under -d DIR

    def environment(self, engine: str | None, name: str) -> dict[str, str]:
        """Variables to add to the server's environment (the torch-profiler directory for `pytorch`)."""
        if not self.enabled or self.tool != "pytorch":
            return {}
        variable = PYTORCH_PROFILER_ENV.get(engine or "")
        if variable is None:
            raise ConfigError("profile.tool: pytorch profiling is supported for vllm and sglang servers "
                              "(their /start_profile endpoint); use nsys or amd for other servers")
        return {variable: str(self.output_for(name))}
