"""The worker's /gpu, /system, /metrics gauges and power profile, in process (fake engine, no GPU here).

nvidia-ml-py is installed in the test environment and this machine has no NVIDIA driver, so /gpu takes the
"library present, NVML cannot start" path for real; the "library absent" path makes its import fail.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import AsyncIterator

import psutil
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from workers.config import WorkerConfig
from workers.engines import create_engine
from workers.server import LOAD_TASK, create_app
from workers.telemetry import GIB, MIB

Client = TestClient[web.Request, web.Application]


@pytest_asyncio.fixture(loop_scope="function")
async def client() -> AsyncIterator[Client]:
    config = WorkerConfig(engine="fake", max_wait_time=0.0)
    app = create_app(config, create_engine(config))
    async with TestClient(TestServer(app)) as test_client:
        await app[LOAD_TASK]
        yield test_client


def test_nvml_is_installed_but_has_no_driver_here() -> None:
    """The premise of the next test: if this machine gains a GPU, it no longer checks the no-driver path."""
    import pynvml

    with pytest.raises(pynvml.NVMLError):
        pynvml.nvmlInit()


async def test_gpu_without_a_driver_says_unavailable_and_why(client: Client) -> None:
    resp = await client.get("/gpu")
    assert resp.status == 200
    body = await resp.json()
    assert body["available"] is False and body["gpus"] == []
    assert "NVML" in body["reason"]


async def test_gpu_without_nvidia_ml_py_says_unavailable_and_why(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    body = await (await client.get("/gpu")).json()
    assert body == {"available": False, "reason": "nvidia-ml-py is not installed", "gpus": []}


async def test_system_figures_agree_with_psutil(client: Client) -> None:
    body = await (await client.get("/system")).json()
    memory = psutil.virtual_memory()
    assert body["ram_total_gb"] == round(memory.total / GIB, 2)
    assert abs(body["ram_used_gb"] - memory.used / GIB) < 0.5  # RAM moves a little between the two reads
    assert body["cpu_count"] == psutil.cpu_count()
    assert abs(body["cpu_load"] - psutil.getloadavg()[0]) < 2.0
    root = next(d for d in body["disks"] if d["mount"] == "/")
    assert root["total_gb"] == round(psutil.disk_usage("/").total / GIB, 2)


async def test_metrics_carry_the_system_and_gpu_gauges(client: Client) -> None:
    text = await (await client.get("/metrics")).text()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(values["worker_system_ram_total_bytes"]) == pytest.approx(
        psutil.virtual_memory().total, rel=0.01
    )
    assert float(values["worker_gpu_available"]) == 0.0
    assert "worker_system_cpu_load" in values


async def test_power_profile_without_a_gpu_is_a_clear_503(client: Client) -> None:
    resp = await client.post("/settings/power_profile", json={"profile": "quiet"})
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "gpu_unavailable" and "NVML" in error["message"]
    current = await (await client.get("/settings/power_profile")).json()
    assert current["available"] is False and current["profiles"] == ["quiet", "normal", "max"]


@pytest.mark.parametrize("body", [b'{"profile": "turbo"}', b"not json", b"[]"])
async def test_power_profile_rejects_bad_input_with_400(client: Client, body: bytes) -> None:
    resp = await client.post("/settings/power_profile", data=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


class FakeNvml(types.ModuleType):
    """NVML as nvidia-ml-py exposes it, for one H100-like GPU without a fan: lets the GPU path run here."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    class NVMLError_NoPermission(NVMLError):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.limit_mw = 700_000
        self.calls: list[int] = []

    def nvmlInit(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54"

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return "GPU-1234"

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 41

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 123_456

    def nvmlDeviceGetPowerManagementLimit(self, h: int) -> int:
        return self.limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h: int) -> int:
        return 700_000

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h: int) -> tuple[int, int]:
        return 200_000, 700_000

    def nvmlDeviceSetPowerManagementLimit(self, h: int, mw: int) -> None:
        self.limit_mw = mw

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=80 * 1024 * MIB, used=1024 * MIB)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetFanSpeed(self, h: int) -> int:
        raise self.NVMLError("Not Supported")  # passively cooled: the field is null, the rest still reads


async def test_gpu_reports_every_field_and_a_power_profile_sets_the_limit(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    body = await (await client.get("/gpu")).json()
    assert body["available"] is True and body["driver_version"] == "550.54"
    assert body["gpus"] == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-1234",
            "memory_total_mb": 81920,
            "memory_used_mb": 1024,
            "utilization_gpu": 87,
            "utilization_mem": 40,
            "temperature_gpu": 41,
            "power_draw_w": 123.5,
            "power_limit_w": 700.0,
            "fan_speed_pct": None,
        }
    ]
    text = await (await client.get("/metrics")).text()
    assert 'worker_gpu_utilization_percent{gpu="0",name="NVIDIA H100 80GB HBM3"} 87.0' in text
    if os.geteuid() == 0:
        resp = await client.post("/settings/power_profile", json={"profile": "quiet"})
        assert resp.status == 200 and nvml.limit_mw == 200_000
        assert (await (await client.get("/settings/power_profile")).json())["profile"] == "quiet"
    else:
        resp = await client.post("/settings/power_profile", json={"profile": "quiet"})
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "needs_root"
