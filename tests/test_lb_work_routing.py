"""Routing that knows the work, over real sockets: weights, affinity, token load, back-pressure, rate limits,
the response cache. An in-process balancer before scriptable upstreams; asserted: which worker got what."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from lb.policies import rendezvous
from lb.state import STATE
from lb.work import WorkReader
from tests.lb_upstream import chat

CHAT = "/v1/chat/completions"


def stats_of(balancer: Any) -> dict[int, Any]:
    """The /stats document of the last balancer started in-process."""
    from lb.stats import backend_stats

    return {b.index: backend_stats(b) for b in balancer.apps[-1][STATE].pool.backends}


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any
) -> tuple[int, str, Any]:
    async with http.post(url + CHAT, json=body, **kw) as resp:
        return resp.status, resp.headers.get("X-LB-Worker", ""), await resp.json()


@pytest.mark.parametrize("policy", ["round_robin", "least_connections"])
async def test_weights_3_to_1_split_400_requests_within_5_percent(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, policy: str
) -> None:
    heavy, light = await upstreams(), await upstreams()
    url = await balancer([heavy.url + "@3", light.url], policy=policy)
    limit = asyncio.Semaphore(8)

    async def one() -> None:
        async with limit:
            assert (await post(http, url, chat()))[0] == 200

    await asyncio.gather(*(one() for _ in range(400)))
    assert abs(heavy.requests - 300) <= 20, (heavy.requests, light.requests)
    assert stats_of(balancer)[0]["weight"] == 3.0


async def test_a_worker_added_with_a_weight_gets_its_share(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    light, heavy = await upstreams(), await upstreams()
    url = await balancer([light], policy="round_robin")
    async with http.post(url + "/workers", json={"url": heavy.url, "weight": "heavy"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "weight"
    async with http.post(url + "/workers", json={"url": heavy.url, "weight": 3}) as resp:
        assert resp.status == 201 and (await resp.json())["weight"] == 3.0
    for _ in range(40):
        assert (await post(http, url, chat()))[0] == 200
    assert (light.requests, heavy.requests) == (10, 30)


async def test_prefix_affinity_keeps_each_prefix_on_one_worker(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    ups = [await upstreams() for _ in range(4)]
    url = await balancer(ups, policy="prefix_affinity", affinity_prefix_chars=200)
    # a balanced load: 8 few-shot prefixes whose keys hash two to each worker (ports, so hashes, vary by run)
    pool = balancer.apps[-1][STATE].pool
    reader = WorkReader(frozenset({"prefix"}), 200, "X-Session-ID")
    per_worker: dict[int, list[str]] = {b.index: [] for b in pool.routable}
    task = 0
    while any(len(keys) < 2 for keys in per_worker.values()):
        text = f"Example {task}: " + f"the few-shot examples of task {task}. " * 30
        work = reader.read([], json.dumps(chat(messages=[{"role": "user", "content": text}])).encode(), None)
        assert work.key is not None
        keys = per_worker[rendezvous(work.key, pool.routable).index]
        if len(keys) < 2:
            keys.append(text)
        task += 1
    prefixes = [text for keys in per_worker.values() for text in keys]
    limit = asyncio.Semaphore(4)

    async def one(p: int, i: int) -> tuple[int, str]:
        body = chat(messages=[{"role": "user", "content": prefixes[p] + f"Question {i}?"}])
        async with limit:
            status, worker, _ = await post(http, url, body)
        assert status == 200
        return p, worker

    order = [(p, i) for i in range(25) for p in range(8)]
    random.Random(0).shuffle(order)  # no arrival pattern a plain rotation could happen to match
    picks = await asyncio.gather(*(one(p, i) for p, i in order))
    by_prefix: dict[int, Counter[str]] = {p: Counter() for p in range(8)}
    for p, worker in picks:
        by_prefix[p][worker] += 1
    for p, workers in by_prefix.items():
        assert workers.most_common(1)[0][1] >= 0.9 * 25, (p, workers)
    assert all(up.requests >= 40 for up in ups), [up.requests for up in ups]  # 2 prefixes x 25 each


async def test_prefix_affinity_spills_when_its_worker_is_over_the_load_bound(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await upstreams(), await upstreams()
    url = await balancer([a, b], policy="prefix_affinity", affinity_max_load=1.25)
    body = chat(messages=[{"role": "user", "content": "A shared few-shot prefix. " * 40}])
    first = (await post(http, url, body))[1]
    held = [
        await http.post(url + CHAT, json={**body, "stream": True, "hold": True}) for _ in range(4)
    ]  # 4 in flight on the key's worker: over ceil(1.25 * 5 / 2) = 4 and AFFINITY_SLACK ahead of the other
    assert {r.headers["X-LB-Worker"] for r in held} == {first}
    assert (await post(http, url, body))[1] != first  # over the bound: the other worker
    for upstream in (a, b):
        upstream.release.set()
    for resp in held:
        await resp.read()
        resp.release()
    assert (await post(http, url, body))[1] == first  # load gone: back to the key's worker


async def test_session_header_or_user_pins_a_session_to_one_worker(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    ups = [await upstreams() for _ in range(3)]
    url = await balancer(ups, policy="session")
    sessions: dict[str, set[str]] = {}
    rng = random.Random(0)
    for _ in range(60):
        session = f"s{rng.randrange(6)}"
        status, worker, _ = await post(http, url, chat(), headers={"X-Session-ID": session})
        assert status == 200
        sessions.setdefault(session, set()).add(worker)
    assert all(len(workers) == 1 for workers in sessions.values())
    assert len(set().union(*sessions.values())) >= 2
    users = {(await post(http, url, chat(user="alice")))[1] for _ in range(10)}
    assert len(users) == 1


async def test_least_tokens_evens_out_token_load_not_request_count(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await upstreams(), await upstreams()
    url = await balancer([a, b], policy="least_tokens")
    long_one = await http.post(url + CHAT, json=chat(stream=True, hold=True, max_tokens=4000))
    shorts = [await http.post(url + CHAT, json=chat(stream=True, hold=True, max_tokens=10)) for _ in range(6)]
    short_workers = {r.headers["X-LB-Worker"] for r in shorts}
    assert short_workers == {"0", "1"} - {long_one.headers["X-LB-Worker"]}  # 6 short ones < 1 long one
    stats = stats_of(balancer)
    assert sorted(s["in_flight"] for s in stats.values()) == [1, 6]
    shorts[0].close()  # a client leaves mid-stream: its tokens are released like its in-flight count
    for upstream in (a, b):
        upstream.release.set()
    for resp in [long_one, *shorts[1:]]:
        await resp.read()
        resp.release()
    for _ in range(100):
        if all(s["tokens_in_flight"] == 0 and s["in_flight"] == 0 for s in stats_of(balancer).values()):
            break
        await asyncio.sleep(0.02)
    assert [s["tokens_in_flight"] for s in stats_of(balancer).values()] == [0, 0]


async def test_503_with_retry_after_is_skipped_for_that_long_and_stays_healthy(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    full, ok = await upstreams(), await upstreams()
    full.status, full.retry_after = 503, "1"
    url = await balancer([full, ok], policy="round_robin")
    async with http.post(url + CHAT, json=chat()) as resp:
        assert resp.status == 200 and resp.headers["X-LB-Retries"] == "1"
    stats = stats_of(balancer)[0]
    assert stats["healthy"] and stats["busy_for_s"] > 0.5 and stats["errors"] == 0
    full.status = 200
    for _ in range(6):
        assert (await post(http, url, chat()))[1] == "1"
    assert full.requests == 1  # skipped while busy, although it would answer now
    await asyncio.sleep(1.1)
    assert {(await post(http, url, chat()))[1] for _ in range(4)} == {"0", "1"}
    assert stats_of(balancer)[0]["healthy"]


async def test_a_request_waits_out_a_short_retry_after_and_fails_fast_on_a_long_one(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    only = await upstreams()
    url = await balancer([only], queue_timeout=3)
    only.status, only.retry_after = 503, "1"
    assert (await post(http, url, chat()))[0] == 503  # nobody else to try: the worker's answer, relayed
    only.status = 200
    started = time.monotonic()
    assert (await post(http, url, chat()))[0] == 200  # queued until the worker's second of rest is over
    assert time.monotonic() - started > 0.5 and only.requests == 2
    only.status, only.retry_after = 503, "60"  # longer than --queue-timeout: no point waiting
    await post(http, url, chat())
    async with http.post(url + CHAT, json=chat()) as resp:
        assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 59
        assert (await resp.json())["error"]["code"] == "workers_busy"
    assert only.requests == 3


async def test_rate_limit_refuses_the_61st_request_of_a_60_rpm_key(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    up = await upstreams()
    keys = tmp_path / "keys"
    keys.write_text("alpha\nbeta rpm=1000\n")
    url = await balancer([up], api_key_file=str(keys), rate_limit_rpm=60)
    for i in range(60):  # both ways of sending the key count against the same key
        headers = {"X-API-Key": "alpha"} if i % 2 else {"Authorization": "Bearer alpha"}
        async with http.post(url + CHAT, json=chat(), headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["x-ratelimit-remaining-requests"] == str(59 - i)
    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="alpha", max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        await sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    await sdk.close()
    response = refused.value.response
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert up.requests == 60
    async with http.post(url + CHAT, json=chat(), headers={"X-API-Key": "beta"}) as resp:
        assert resp.status == 200 and resp.headers["x-ratelimit-limit-requests"] == "1000"
    async with http.post(url + CHAT, json=chat(), headers={"X-API-Key": "wrong"}) as resp:
        assert resp.status == 401


async def test_repeated_greedy_request_is_answered_from_the_cache(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer([up], cache_size=16)
    greedy = chat(temperature=0, max_tokens=8)
    first = await post(http, url, greedy)
    async with http.post(url + CHAT, json=greedy) as resp:
        assert resp.headers["X-LB-Cache"] == "hit"
        assert await resp.json() == first[2]
    assert up.requests == 1  # no worker saw the repeat
    seeded = chat(seed=7)
    await post(http, url, seeded)
    await post(http, url, seeded)
    assert up.requests == 2
    for body in (chat(temperature=0.8), chat(temperature=0, stream=True)):  # sampled, streamed: never cached
        for _ in range(2):
            async with http.post(url + CHAT, json=body) as resp:
                assert resp.status == 200 and "X-LB-Cache" not in resp.headers
                await resp.read()
    assert up.requests == 6
    async with http.get(url + "/metrics") as resp:
        metrics = await resp.text()
    assert 'lb_cache_lookups_total{result="hit"} 2.0' in metrics
    assert json.loads(up.bodies[0]) == greedy
