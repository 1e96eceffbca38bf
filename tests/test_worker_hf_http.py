"""A real `python -m workers --engine hf` process on the tiny model, driven over HTTP by the `openai` SDK."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from tests.processes import ManagedProcess, free_port, get_json, python_module

MAX_MODEL_LEN = 512
BATCH_SIZE = 16
PROMPTS = [f"{i}: " + "def handler(request):\n    return request.path\n" * (1 + i % 5) for i in range(16)]


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The worker's base URL; the process is stopped (by process group) when the module's tests end."""
    port = free_port()
    args = python_module(
        "workers", "--engine", "hf", "--model-path", str(tiny_model_dir), "--served-model-name", "tiny",
        "--port", str(port), "--batch-size", str(BATCH_SIZE), "--max-wait-time", "0.05",
        "--max-model-len", str(MAX_MODEL_LEN), "--device", "cpu",
    )
    proc = ManagedProcess(args, tmp_path_factory.mktemp("worker") / "worker.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http_ok(url + "/health", timeout=120)
        yield url
    finally:
        proc.stop()


@pytest_asyncio.fixture(loop_scope="function")  # the SDK's connections belong to the test's own loop
async def client(worker: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=worker + "/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


def metric(worker: str, name: str) -> float:
    """Sum of a Prometheus counter/gauge over its label sets."""
    with urllib.request.urlopen(worker + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(text))


async def complete(client: AsyncOpenAI, prompt: str, max_tokens: int = 12) -> str:
    out = await client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == max_tokens
    return out.choices[0].text


async def test_concurrent_requests_share_batches_and_each_gets_its_own_result(
    worker: str, client: AsyncOpenAI,
) -> None:
    singles = [await complete(client, p) for p in PROMPTS]
    assert len(set(singles)) > len(PROMPTS) // 2  # discriminative: the prompts continue differently
    batches_before = metric(worker, "worker_batches_total")
    together = await asyncio.gather(*(complete(client, p) for p in PROMPTS))
    batches = metric(worker, "worker_batches_total") - batches_before
    assert together == singles
    assert 1 <= batches < len(PROMPTS)


async def test_stream_delivers_its_first_token_before_its_last_is_generated(client: AsyncOpenAI) -> None:
    start = time.monotonic()
    arrivals: list[float] = []
    stream = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=200, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 200
    assert len(arrivals) > 100
    assert arrivals[0] < arrivals[-1] / 2  # the first text came while most of the tokens were still to come


async def test_health_answers_quickly_while_a_long_batch_runs(worker: str, client: AsyncOpenAI) -> None:
    long_batch = asyncio.gather(*(complete(client, p, max_tokens=200) for p in PROMPTS[:8]))
    probes: list[float] = []
    running_seen = 0
    try:
        await asyncio.sleep(0.3)
        for _ in range(10):
            started = time.monotonic()
            health = await asyncio.to_thread(get_json, worker + "/health", 10.0)
            probes.append(time.monotonic() - started)
            assert health["status"] == "ok"
            running_seen = max(running_seen, int(health["running"]))
            await asyncio.sleep(0.05)
    finally:
        await long_batch
    assert running_seen > 0  # the probes really overlapped the batch
    assert max(probes) < 1.0  # generous: the engine never runs on the event loop


BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "max_tokens": 4}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "max_tokens": 4}, 400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": MAX_MODEL_LEN + 1}, 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * MAX_MODEL_LEN, "max_tokens": 4}, 400, None),
    ("/v1/completions", {"model": "other", "prompt": "x", "max_tokens": 4}, 404, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 100}}, 400, "logit_bias"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
async def test_bad_input_gets_its_error_and_the_worker_keeps_serving(
    worker: str, client: AsyncOpenAI, path: str, body: Any, status: int, param: str | None,
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(worker + path, data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=30)
    assert caught.value.code == status
    error = json.loads(caught.value.read())["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    assert await complete(client, "still serving", max_tokens=3)


async def test_sdk_sees_openai_errors(client: AsyncOpenAI) -> None:
    with pytest.raises(NotFoundError):
        await client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(BadRequestError):
        await client.completions.create(model="tiny", prompt="word " * MAX_MODEL_LEN, max_tokens=2)


async def test_disconnected_stream_frees_its_slot_and_stops_generating(
    worker: str, client: AsyncOpenAI,
) -> None:
    stream = await client.completions.create(
        model="tiny", prompt="a long story", max_tokens=400, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    received = 0
    async for _chunk in stream:
        received += 1
        if received == 3:
            break
    await stream.close()  # the client goes away mid-generation
    for _ in range(200):  # up to ~10 s for the worker to notice the closed connection
        health = get_json(worker + "/health", 10.0)
        if not health["running"]:
            break
        await asyncio.sleep(0.05)
    assert health["running"] == 0
    # the engine stopped decoding it: the worker is idle (400 tokens would keep a core busy for seconds)
    process = psutil.Process(health["pid"])
    before = sum(process.cpu_times()[:2])
    await asyncio.sleep(1.0)
    assert sum(process.cpu_times()[:2]) - before < 0.5
    assert await complete(client, "next one", max_tokens=3)
