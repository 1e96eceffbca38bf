"""Balancer integration: fake-engine workers and `python -m lb` as processes, the openai SDK as client."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable

import openai
import pytest

from tests.conftest import SpawnFn
from tests.lb_cluster import (
    async_wait_until,
    get_json,
    post_json,
    start_lb,
    start_worker,
    start_workers,
    wait_until,
    workers_stats,
)

SdkFor = Callable[..., openai.AsyncOpenAI]
MESSAGES = [{"role": "user", "content": "hello"}]


async def test_round_robin_spreads_400_requests_exactly_evenly(spawn: SpawnFn, sdk_for: SdkFor) -> None:
    workers = start_workers(spawn, 4)
    lb = start_lb(spawn, workers, "--policy", "round_robin")
    sdk = sdk_for(lb)
    limit = asyncio.Semaphore(16)

    async def one() -> str:
        async with limit:
            raw = await sdk.chat.completions.with_raw_response.create(
                model="fake-model", messages=MESSAGES, max_tokens=2
            )
            assert raw.parse().choices[0].message.content
            return raw.headers["X-LB-Worker"]

    picks = Counter(await asyncio.gather(*(one() for _ in range(400))))
    assert picks == {"0": 100, "1": 100, "2": 100, "3": 100}
    assert [w["requests_served"] for w in workers_stats(lb)] == [100, 100, 100, 100]


async def test_least_connections_sends_new_requests_to_the_idle_worker(
    spawn: SpawnFn, sdk_for: SdkFor
) -> None:
    busy, idle = start_workers(spawn, 2, "--fake-step-latency", "0.05")
    lb = start_lb(spawn, [busy], "--policy", "least_connections")
    sdk = sdk_for(lb)
    streams = [
        await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=400, stream=True)
        for _ in range(3)
    ]
    for stream in streams:
        await stream.__anext__()  # the long streams are running on the busy worker
    assert post_json(lb.url + "/workers", {"url": idle.url})[0] == 201
    picks = Counter()
    for _ in range(10):
        raw = await sdk.chat.completions.with_raw_response.create(
            model="fake-model", messages=MESSAGES, max_tokens=2
        )
        picks[raw.headers["X-LB-Worker"]] += 1
    assert picks == {"1": 10}
    assert workers_stats(lb)[0]["in_flight"] == 3
    for stream in streams:
        await stream.close()


async def test_sigkilled_worker_is_dropped_retried_around_and_re_added(
    spawn: SpawnFn, sdk_for: SdkFor
) -> None:
    workers = start_workers(spawn, 3, "--fake-step-latency", "0.005")
    lb = start_lb(
        spawn, workers, "--policy", "round_robin", "--unhealthy-threshold", "2", "--healthy-threshold", "2"
    )
    sdk = sdk_for(lb)
    results: list[str] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            reply = await sdk.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=3)
            results.append(reply.choices[0].finish_reason or "")

    loaders = [asyncio.create_task(load()) for _ in range(8)]
    await asyncio.sleep(0.5)
    victim = workers[1]
    killed_at = time.monotonic()
    victim.proc.signal(signal.SIGKILL)
    await async_wait_until(lambda: not workers_stats(lb)[1]["healthy"], timeout=10)
    drop_delay = time.monotonic() - killed_at
    await asyncio.sleep(0.5)
    restarted = start_worker(spawn, "--fake-step-latency", "0.005", port=victim.port, wait=False)
    await asyncio.to_thread(restarted.proc.wait_http_ok, restarted.url + "/health", 30)  # fails with its log
    up_at = time.monotonic()
    await async_wait_until(lambda: workers_stats(lb)[1]["healthy"], timeout=10)
    readd_delay = time.monotonic() - up_at
    stop.set()
    await asyncio.gather(*loaders)  # any failed request would raise here
    # re-added means routed to again: round robin over three sends one request in three to the new process
    served_by = []
    for _ in range(6):
        raw = await sdk.chat.completions.with_raw_response.create(
            model="fake-model", messages=MESSAGES, max_tokens=3
        )
        served_by.append(raw.headers["X-LB-Worker"])
    print(
        f"\nSIGKILL -> dropped after {drop_delay * 1000:.0f} ms; "
        f"restarted worker healthy -> re-added after {readd_delay * 1000:.0f} ms; "
        f"{len(results)} requests, none failed"
    )
    assert len(results) > 50
    assert "1" in served_by, served_by  # answered by the restarted worker, not merely counted before the kill


async def test_streaming_is_not_buffered(spawn: SpawnFn, sdk_for: SdkFor) -> None:
    (worker,) = start_workers(spawn, 1, "--fake-step-latency", "0.1")
    lb = start_lb(spawn, [worker])
    started = time.monotonic()
    stream = await sdk_for(lb).chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=15, stream=True
    )
    arrivals = [
        time.monotonic() - started
        async for chunk in stream
        if chunk.choices and chunk.choices[0].delta.content
    ]
    assert len(arrivals) == 15
    # the worker needs ~1.5 s for 15 tokens; a buffering proxy would deliver them all at the end
    assert arrivals[0] < arrivals[-1] - 0.8


async def test_client_disconnect_releases_in_flight_and_cancels_the_worker(
    spawn: SpawnFn, sdk_for: SdkFor
) -> None:
    (worker,) = start_workers(spawn, 1, "--fake-step-latency", "0.05")
    lb = start_lb(spawn, [worker])
    stream = await sdk_for(lb).chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        max_tokens=2000,
        stream=True,  # ~100 s if nobody stops it
    )
    await stream.__anext__()
    await stream.__anext__()
    assert workers_stats(lb)[0]["in_flight"] == 1
    assert get_json(worker.url + "/health")["running"] == 1
    await stream.close()
    wait_until(lambda: workers_stats(lb)[0]["in_flight"] == 0, timeout=5)
    wait_until(lambda: get_json(worker.url + "/health")["running"] == 0, timeout=5)


async def test_two_models_each_reach_their_own_workers(spawn: SpawnFn, sdk_for: SdkFor) -> None:
    alpha = start_workers(spawn, 2, "--served-model-name", "org/Alpha-Instruct")
    beta = start_workers(spawn, 1, "--served-model-name", "beta")
    lb = start_lb(spawn, alpha + beta, "--policy", "round_robin")
    sdk = sdk_for(lb)
    for model, expected in [("org/Alpha-Instruct", {"0", "1"}), ("alpha", {"0", "1"}), ("BETA", {"2"})]:
        seen = set()
        for _ in range(4):
            raw = await sdk.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, max_tokens=2
            )
            seen.add(raw.headers["X-LB-Worker"])
        assert seen == expected, model
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=2)
    assert "beta" in str(info.value) and "org/Alpha-Instruct" in str(info.value)
    assert sorted(m.id for m in (await sdk.models.list()).data) == ["beta", "org/Alpha-Instruct"]
