"""Which GPUs this machine shows, and how they are split into per-worker `CUDA_VISIBLE_DEVICES` values.

Detection order: an explicit `CUDA_VISIBLE_DEVICES` in our own environment (as SLURM sets it), then
`nvidia-smi`, then NVML (`nvidia-ml-py`, when installed), then torch only when NVIDIA device nodes exist
(importing torch costs seconds, so it is never tried on a machine that plainly has no GPU).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
from collections.abc import Mapping

from lb.settings import ConfigError

CPU = ""  # CUDA_VISIBLE_DEVICES of a CPU worker: set and empty, so CUDA sees no device at all


def parse_gpu_ids(text: str, key: str = "gpu_ids") -> list[str]:
    """`0,2,4` (or GPU UUIDs / MIG ids, as CUDA_VISIBLE_DEVICES allows) → ['0', '2', '4']; no duplicates."""
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise ConfigError(f"{key}: no GPU ids in {text!r}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{key}: a GPU id is listed twice in {text!r}")
    for gpu in ids:
        if not (gpu.isdigit() or gpu.startswith(("GPU-", "MIG-"))):
            raise ConfigError(f"{key}: {gpu!r} is not a GPU index or UUID")
    return ids


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids a worker could be given here; [] on a machine without GPUs."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        text = env["CUDA_VISIBLE_DEVICES"].strip()
        return [] if not text or text == "-1" else parse_gpu_ids(text, "CUDA_VISIBLE_DEVICES")
    for probe in (_nvidia_smi, _nvml, _torch):
        found = probe()
        if found is not None:
            return found
    return []


def _nvidia_smi() -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def _nvml() -> list[str] | None:
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml

    try:
        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def _torch() -> list[str] | None:
    if not glob.glob("/dev/nvidia[0-9]*") or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_gpus(*, gpus: int | None, gpu_ids: str | None, cpu_workers: int | None, gpus_per_worker: int,
                visible: list[str]) -> list[str]:
    """One CUDA_VISIBLE_DEVICES value per worker (`CPU` for CPU workers), from the launcher's GPU flags.

    No flag: every visible GPU, or 2 CPU workers when there is none. `--gpus N` takes the first N visible
    GPUs; on a machine that shows none it assigns ids 0..N-1 anyway (so the split is testable without GPUs).
    """
    if cpu_workers is not None:
        return [CPU] * cpu_workers
    if gpu_ids is not None:
        ids = parse_gpu_ids(gpu_ids)
    elif gpus is not None:
        if not visible:
            ids = [str(i) for i in range(gpus)]
        elif gpus > len(visible):
            raise ConfigError(f"gpus: {gpus} requested but only {len(visible)} visible ({','.join(visible)})")
        else:
            ids = visible[:gpus]
    elif visible:
        ids = visible
    else:
        return [CPU] * 2
    if len(ids) % gpus_per_worker:
        raise ConfigError(f"gpus_per_worker: {len(ids)} GPUs do not split into groups of {gpus_per_worker}")
    return [",".join(ids[i:i + gpus_per_worker]) for i in range(0, len(ids), gpus_per_worker)]
