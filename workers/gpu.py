"""What /health reports about the GPU this worker uses: from torch when loaded, else NVML, else null."""

from __future__ import annotations

import os
import sys
from typing import Any


def cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def gpu_info(device: str) -> dict[str, Any] | None:
    """Name and memory (bytes) of the engine's GPU, or None when it runs on CPU or nothing can tell."""
    if not device.startswith("cuda"):
        return None
    torch = sys.modules.get("torch")  # only if the engine already imported it: never pay the import here
    if torch is not None and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return {"name": props.name, "memory_total": int(props.total_memory),
                "memory_allocated": int(torch.cuda.memory_allocated(index)), "source": "torch"}
    return _nvml_info()


def _nvml_info() -> dict[str, Any] | None:
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        visible = (cuda_visible_devices() or "0").split(",")[0]
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit() else \
            pynvml.nvmlDeviceGetHandleByUUID(visible)
        name = pynvml.nvmlDeviceGetName(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"name": name.decode() if isinstance(name, bytes) else name, "memory_total": int(memory.total),
                "memory_used": int(memory.used), "source": "nvml"}
    except Exception:  # NVML missing a driver or the device: report no GPU rather than fail /health
        return None
