"""Balancer integration: backpressure, auth, admin API, SIGTERM drain, a tiny transformers model."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.conftest import SpawnFn
from tests.lb_cluster import Proc, post_json, start_lb, start_workers, wait_until, workers_stats
from tests.processes import free_port, get_json, python_module

SdkFor = Callable[..., openai.AsyncOpenAI]
MESSAGES = [{"role": "user", "content": "hello"}]


async def test_full_workers_queue_then_429(spawn: SpawnFn, sdk_for: SdkFor) -> None:
    (worker,) = start_workers(spawn, 1, "--fake-step-latency", "0.05")
    lb = start_lb(
        spawn, [worker], "--max-inflight-per-worker", "1", "--max-queue", "1", "--queue-timeout", "20"
    )
    sdk = sdk_for(lb)
    holder = await sdk.chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=400, stream=True
    )
    await holder.__anext__()
    queued = asyncio.create_task(
        sdk.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2)
    )
    await asyncio.sleep(0.3)
    assert get_json(lb.url + "/stats")["queue_depth"] == 1
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2)
    assert info.value.response.headers["Retry-After"]
    assert not queued.done()
    await holder.close()  # frees the worker's only slot: the queued request runs
    reply = await asyncio.wait_for(queued, 10)
    assert reply.choices[0].message.content


async def test_no_healthy_worker_is_503_with_retry_after(spawn: SpawnFn, sdk_for: SdkFor) -> None:
    lb = start_lb(spawn, [f"http://127.0.0.1:{free_port()}"], wait_healthy=False)
    with pytest.raises(openai.APIStatusError) as info:
        await sdk_for(lb).chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 503 and info.value.response.headers["Retry-After"]
    assert info.value.response.json()["error"]["code"] == "no_healthy_backend"


async def test_api_key_is_required(spawn: SpawnFn, sdk_for: SdkFor, tmp_path: Path) -> None:
    workers = start_workers(spawn, 1)
    key_file = tmp_path / "keys"
    key_file.write_text("# clients\nsecond-key\n")
    lb = start_lb(spawn, workers, "--api-key", "first-key", "--api-key-file", str(key_file))
    with pytest.raises(openai.AuthenticationError):
        await sdk_for(lb, api_key="wrong").chat.completions.create(model="fake-model", messages=MESSAGES)
    status, body = post_json(lb.url + "/v1/chat/completions", {"model": "fake-model", "messages": MESSAGES})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # no Authorization header at all
    for key in ("first-key", "second-key"):
        reply = await sdk_for(lb, api_key=key).chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=2
        )
        assert reply.choices[0].message.content
    assert "first-key" not in lb.proc.log_path.read_text()


async def test_admin_adds_a_worker_and_drain_removes_it(spawn: SpawnFn, sdk_for: SdkFor) -> None:
    first, second = start_workers(spawn, 2, "--fake-step-latency", "0.02")
    # round robin, not least_connections: the latter avoids the busy draining worker anyway, so only round
    # robin shows that a draining worker is taken out of the rotation
    lb = start_lb(spawn, [], "--policy", "round_robin")  # no workers yet: the launcher and SLURM job add them
    assert get_json(lb.url + "/stats")["total_workers"] == 0
    for worker in (first, second):
        status, body = post_json(lb.url + "/workers", {"url": worker.url})
        assert status == 201 and body["healthy"] and body["models"] == ["fake-model"]
    sdk = sdk_for(lb)
    stream = await sdk.chat.completions.with_raw_response.create(
        model="fake-model", messages=MESSAGES, max_tokens=40, stream=True
    )
    index = stream.headers["X-LB-Worker"]
    chunks = stream.parse()
    removal = asyncio.create_task(asyncio.to_thread(post_json, f"{lb.url}/workers/{index}", {}, "DELETE"))
    await asyncio.sleep(0.2)
    assert not removal.done()  # draining: waits for the stream
    for _ in range(3):  # meanwhile new requests avoid the draining worker
        raw = await sdk.chat.completions.with_raw_response.create(
            model="fake-model", messages=MESSAGES, max_tokens=1
        )
        assert raw.headers["X-LB-Worker"] != index
    texts = [c.choices[0].delta.content async for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) == 40  # the in-flight stream finished whole
    status, body = await removal
    assert status == 200 and body["drained"] is True
    assert [w["index"] for w in workers_stats(lb)] == [1 - int(index)]


async def test_sigterm_drains_in_flight_requests_then_exits_zero(spawn: SpawnFn, sdk_for: SdkFor) -> None:
    workers = start_workers(spawn, 1, "--fake-step-latency", "0.05")
    lb = start_lb(spawn, workers)
    request = asyncio.create_task(
        sdk_for(lb).chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=30)  # ~1.5 s
    )
    await asyncio.sleep(0.4)
    lb.proc.signal(signal.SIGTERM)
    reply = await asyncio.wait_for(request, 20)
    assert reply.usage is not None and reply.usage.completion_tokens == 30
    assert await asyncio.to_thread(lb.proc.popen.wait, 20) == 0


@pytest.mark.timeout(300)
async def test_tiny_transformers_model_end_to_end(
    spawn: SpawnFn, sdk_for: SdkFor, tiny_model_dir: Path
) -> None:
    port = free_port()
    cmd = python_module(
        "workers",
        "--engine",
        "hf",
        "--model-path",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--served-model-name",
        "tiny",
    )
    worker = Proc(spawn(cmd, name="hf-worker"), port)
    worker.proc.wait_http_ok(worker.url + "/health", timeout=240)
    lb = start_lb(spawn, [worker])
    sdk = sdk_for(lb)
    reply = await sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.model and reply.choices[0].message.content is not None
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    started = time.monotonic()
    stream = await sdk.completions.create(
        model="tiny", prompt="The", max_tokens=8, temperature=0, stream=True
    )
    pieces = [c.choices[0].text async for c in stream if c.choices]
    assert pieces and time.monotonic() - started < 120
    wait_until(lambda: workers_stats(lb)[0]["in_flight"] == 0, timeout=5)
    assert workers_stats(lb)[0]["requests_served"] == 2
