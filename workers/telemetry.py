"""GPU (NVML) and system (psutil) figures for /gpu, /system and the Prometheus gauges; power profiles.

`nvidia-ml-py` is imported on first use and only if installed; without it, without a driver, or without a
GPU, /gpu answers `{"available": false, "reason": ...}`. NVML is initialised once and kept (an init costs
tens of milliseconds); a failed init is retried at most once a minute. Memory figures are MiB ("mb") and
GiB ("gb"), i.e. powers of two, as nvidia-smi and free(1) print them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import psutil
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("workers.telemetry")

MIB = 1 << 20
GIB = 1 << 30
RETRY_INIT_S = 60.0
POWER_PROFILES = ("quiet", "normal", "max")  # NVML power limit: lowest allowed, the board default, highest


class GpuUnavailable(Exception):
    """No GPU can be read (no nvidia-ml-py, no driver, no device); the message says which."""


class GpuReader:
    """One worker's NVML handle on the GPUs it may use (CUDA_VISIBLE_DEVICES, else all)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._reason: str | None = None
        self._tried_at = -RETRY_INIT_S
        self.profile: str | None = None  # the last power profile set through this worker

    def _init(self) -> Any:
        if self._nvml is not None:
            return self._nvml
        if time.monotonic() - self._tried_at < RETRY_INIT_S and self._reason is not None:
            raise GpuUnavailable(self._reason)
        self._tried_at = time.monotonic()
        try:
            import pynvml  # nvidia-ml-py: optional
        except ImportError:
            self._reason = "nvidia-ml-py is not installed"
            raise GpuUnavailable(self._reason) from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._reason = f"NVML could not start (no NVIDIA driver?): {exc}"
            raise GpuUnavailable(self._reason) from None
        self._nvml, self._reason = pynvml, None
        return pynvml

    def handles(self) -> list[tuple[int, Any]]:
        """(index, NVML handle) of each GPU this worker may use; GpuUnavailable when there is none."""
        nvml = self._init()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            if visible is None:
                ids: list[str] = [str(i) for i in range(nvml.nvmlDeviceGetCount())]
            else:
                ids = [v.strip() for v in visible.split(",") if v.strip()]
            out = []
            for position, ident in enumerate(ids):
                handle = (
                    nvml.nvmlDeviceGetHandleByIndex(int(ident))
                    if ident.isdigit()
                    else nvml.nvmlDeviceGetHandleByUUID(ident)
                )
                out.append((position, handle))
        except nvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML cannot open the GPUs ({visible or 'all'}): {exc}") from None
        if not out:
            raise GpuUnavailable("no GPU visible to this worker (CUDA_VISIBLE_DEVICES is empty)")
        return out

    def read(self) -> dict[str, Any]:
        """The /gpu answer: every visible GPU's figures, or `{"available": false, "reason"}`."""
        try:
            handles = self.handles()
        except GpuUnavailable as exc:
            return {"available": False, "reason": str(exc), "gpus": []}
        nvml = self._nvml
        return {
            "available": True,
            "driver_version": _text(_try(nvml, nvml.nvmlSystemGetDriverVersion)),
            "power_profile": self.profile,
            "gpus": [self._one(index, handle) for index, handle in handles],
        }

    def _one(self, index: int, handle: Any) -> dict[str, Any]:
        nvml = self._nvml
        memory = _try(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
        rates = _try(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
        power = _try(nvml, nvml.nvmlDeviceGetPowerUsage, handle)  # milliwatts
        limit = _try(nvml, nvml.nvmlDeviceGetPowerManagementLimit, handle)
        return {
            "index": index,
            "name": _text(_try(nvml, nvml.nvmlDeviceGetName, handle)),
            "uuid": _text(_try(nvml, nvml.nvmlDeviceGetUUID, handle)),
            "memory_total_mb": round(memory.total / MIB) if memory else None,
            "memory_used_mb": round(memory.used / MIB) if memory else None,
            "utilization_gpu": rates.gpu if rates else None,
            "utilization_mem": rates.memory if rates else None,
            "temperature_gpu": _try(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
            "power_draw_w": round(power / 1000, 1) if power is not None else None,
            "power_limit_w": round(limit / 1000, 1) if limit is not None else None,
            "fan_speed_pct": _try(nvml, nvml.nvmlDeviceGetFanSpeed, handle),  # none on passively cooled GPUs
        }

    def set_power_profile(self, profile: str) -> dict[str, Any]:
        """Set every visible GPU's power limit for `profile`; GpuUnavailable or PermissionError otherwise."""
        handles = self.handles()
        if os.geteuid() != 0:
            raise PermissionError("setting a GPU power limit needs root (NVML refuses other users)")
        nvml = self._nvml
        limits = []
        for index, handle in handles:
            low, high = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            default = nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
            target = {"quiet": low, "normal": default, "max": high}[profile]
            try:
                nvml.nvmlDeviceSetPowerManagementLimit(handle, target)
            except nvml.NVMLError_NoPermission:
                raise PermissionError("NVML refused to set the power limit (needs root)") from None
            limits.append({"index": index, "power_limit_w": round(target / 1000, 1)})
        self.profile = profile
        log.info("power profile %s: %s", profile, limits)
        return {"profile": profile, "gpus": limits}


def _try(nvml: Any, call: Any, *args: Any) -> Any:
    """One NVML query; None when this GPU does not support it (e.g. fan speed on an H100)."""
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class CpuPercent:
    """CPU use over at least `MIN_SPAN_S`: psutil measures since its previous call, so /system and /metrics
    read back to back would otherwise see a span of microseconds (0% or 100%)."""

    MIN_SPAN_S = 1.0

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # starts psutil's span
        self._at = time.monotonic()
        self._value = 0.0

    def read(self) -> float:
        if time.monotonic() - self._at >= self.MIN_SPAN_S:
            self._value = psutil.cpu_percent(interval=None)
            self._at = time.monotonic()
        return self._value


def system_stats(cpu: CpuPercent) -> dict[str, Any]:
    """The /system answer: load, memory and mounted disks, as psutil reports them."""
    memory = psutil.virtual_memory()
    disks = []
    seen: set[str] = set()
    for part in psutil.disk_partitions(all=False):
        if part.mountpoint in seen:
            continue
        seen.add(part.mountpoint)
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue  # unreadable or gone between listing and asking
        disks.append(
            {
                "mount": part.mountpoint,
                "used_gb": round(usage.used / GIB, 2),
                "total_gb": round(usage.total / GIB, 2),
                "percent": usage.percent,
            }
        )
    return {
        "cpu_load": round(psutil.getloadavg()[0], 2),  # 1-minute load average
        "cpu_count": psutil.cpu_count(),
        "cpu_percent": cpu.read(),  # all cores, over the last second or more
        "ram_used_gb": round(memory.used / GIB, 2),
        "ram_total_gb": round(memory.total / GIB, 2),
        "ram_percent": memory.percent,
        "disks": disks,
    }


class TelemetryCollector(Collector):
    """The /gpu and /system figures as `worker_gpu_*` and `worker_system_*` gauges, read at scrape time."""

    def __init__(self, gpus: GpuReader, cpu: CpuPercent) -> None:
        self._gpus = gpus
        self._cpu = cpu

    def collect(self) -> Iterator[Metric]:
        system = system_stats(self._cpu)
        yield GaugeMetricFamily("worker_system_cpu_load", "1-minute load average", value=system["cpu_load"])
        yield GaugeMetricFamily(
            "worker_system_cpu_percent", "CPU use, all cores", value=system["cpu_percent"]
        )
        yield GaugeMetricFamily(
            "worker_system_ram_used_bytes", "RAM in use", value=system["ram_used_gb"] * GIB
        )
        yield GaugeMetricFamily("worker_system_ram_total_bytes", "RAM", value=system["ram_total_gb"] * GIB)
        disk = GaugeMetricFamily("worker_system_disk_used_percent", "Disk use by mount", labels=["mount"])
        for d in system["disks"]:
            disk.add_metric([d["mount"]], d["percent"])
        yield disk
        gpu = self._gpus.read()
        yield GaugeMetricFamily(
            "worker_gpu_available", "1 when NVML reads a GPU", value=1.0 if gpu["available"] else 0.0
        )
        gauges = {
            "utilization_gpu": ("worker_gpu_utilization_percent", "GPU busy time"),
            "utilization_mem": ("worker_gpu_memory_utilization_percent", "GPU memory controller busy time"),
            "memory_used_mb": ("worker_gpu_memory_used_mib", "GPU memory in use"),
            "memory_total_mb": ("worker_gpu_memory_total_mib", "GPU memory"),
            "temperature_gpu": ("worker_gpu_temperature_celsius", "GPU temperature"),
            "power_draw_w": ("worker_gpu_power_draw_watts", "GPU power draw"),
            "power_limit_w": ("worker_gpu_power_limit_watts", "GPU power limit"),
            "fan_speed_pct": ("worker_gpu_fan_speed_percent", "GPU fan speed"),
        }
        for key, (name, documentation) in gauges.items():
            family = GaugeMetricFamily(name, documentation, labels=["gpu", "name"])
            for g in gpu["gpus"]:
                if g[key] is not None:
                    family.add_metric([str(g["index"]), g["name"] or ""], float(g[key]))
            yield family
