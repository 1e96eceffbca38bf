"""The balancer's own answers over real sockets: errors, auth, queue, admin API, /stats and /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.lb_upstream import both_loops, chat
from tests.processes import free_port

CHAT = "/v1/chat/completions"
event_loop_policy = pytest.fixture(scope="module", params=["asyncio", "uvloop"])(both_loops)


async def test_no_healthy_backend_is_503_with_retry_after(balancer: Any, http: aiohttp.ClientSession) -> None:
    url = await balancer([f"http://127.0.0.1:{free_port()}"])
    async with http.post(url + CHAT, json=chat()) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert (await resp.json())["error"]["code"] == "no_healthy_backend"
    async with http.get(url + "/health") as resp:
        assert resp.status == 503


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/nope", b"{}", 404, "not_found"),
        (CHAT, b"{not json", 400, "invalid_json"),
        (CHAT, b'{"model": "unknown"}', 404, "model_not_found"),
        (CHAT, b"x" * 3000, 413, "request_too_large"),
    ],
)
async def test_bad_input_gets_openai_style_errors(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, path: str, body: bytes, status: int, code: str
) -> None:
    a, b = await upstreams("model-a"), await upstreams("model-b")  # two models: routing reads the body
    url = await balancer([a, b], max_body_size=2048)
    async with http.post(url + path, data=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    if code == "model_not_found":
        assert "model-a, model-b" in error["message"]


async def test_two_models_reach_their_own_workers(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await upstreams("org/Model-A-Instruct"), await upstreams("model-b")
    url = await balancer([a, b])
    for model, worker in [
        ("org/Model-A-Instruct", "0"),
        ("model-a", "0"),
        ("MODEL-B", "1"),
        ("model-b", "1"),
    ]:
        async with http.post(url + CHAT, json=chat() | {"model": model}) as resp:
            assert resp.status == 200 and resp.headers["X-LB-Worker"] == worker, model
    async with http.get(url + "/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["model-b", "org/Model-A-Instruct"]


async def test_api_key_required(upstreams: Any, balancer: Any, http: aiohttp.ClientSession) -> None:
    url = await balancer([await upstreams()], api_key=["sekret", "other"])
    async with http.post(url + CHAT, json=chat()) as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    async with http.post(url + CHAT, json=chat(), headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    async with http.post(url + CHAT, json=chat(), headers={"Authorization": "Bearer other"}) as resp:
        assert resp.status == 200
    async with http.get(url + "/v1/models") as resp:
        assert resp.status == 401
    async with http.get(url + "/v1/models", headers={"Authorization": "Bearer sekret"}) as resp:
        assert resp.status == 200 and (await resp.json())["data"][0]["id"] == "tiny"


async def test_queue_then_429(upstreams: Any, balancer: Any, http: aiohttp.ClientSession) -> None:
    up = await upstreams()
    url = await balancer([up], max_inflight_per_worker=1, max_queue=1, queue_timeout=5)
    holder = await http.post(url + CHAT, json=chat(stream=True, hold=True))
    await holder.content.readuntil(b"\n\n")
    queued = asyncio.create_task(http.post(url + CHAT, json=chat()))
    await asyncio.sleep(0.1)
    async with http.get(url + "/stats") as resp:
        assert (await resp.json())["queue_depth"] == 1
    async with http.post(url + CHAT, json=chat()) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"]
        assert (await resp.json())["error"]["type"] == "rate_limit_error"
    up.release.set()
    await holder.read()
    holder.release()
    async with await queued as resp:
        assert resp.status == 200


async def test_admin_adds_and_drain_removes(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await upstreams(), await upstreams()
    url = await balancer([])
    async with http.post(url + CHAT, json=chat()) as resp:
        assert resp.status == 503  # started with zero workers
    for up in (a, b):
        async with http.post(url + "/workers", json={"url": up.url}) as resp:
            assert resp.status == 201 and (await resp.json())["models"] == ["tiny"]
    async with http.post(url + "/workers", json={"url": f"http://127.0.0.1:{free_port()}"}) as resp:
        assert resp.status == 502  # probed first: nothing listens there
    holder = await http.post(url + CHAT, json=chat(stream=True, hold=True), headers={})
    await holder.content.readuntil(b"\n\n")
    index = holder.headers["X-LB-Worker"]
    removal = asyncio.create_task(http.delete(f"{url}/workers/{index}"))
    await asyncio.sleep(0.2)
    assert not removal.done()  # waits for the in-flight stream
    for _ in range(3):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.headers["X-LB-Worker"] != index  # draining: no new requests
    a.release.set(), b.release.set()
    assert (await holder.read()).endswith(b"[DONE]\n\n")
    async with await removal as resp:
        assert resp.status == 200 and (await resp.json())["drained"] is True
    async with http.get(url + "/stats") as resp:
        stats = await resp.json()
    assert stats["total_workers"] == 1 and str(stats["workers"][0]["index"]) != index


async def test_admin_token_required_when_set(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer([], admin_token="t0ken")
    async with http.post(url + "/workers", json={"url": up.url}) as resp:
        assert resp.status == 401
    async with http.post(
        url + "/workers", json={"url": up.url}, headers={"Authorization": "Bearer t0ken"}
    ) as resp:
        assert resp.status == 201


async def test_stats_and_metrics_shape(upstreams: Any, balancer: Any, http: aiohttp.ClientSession) -> None:
    url = await balancer([await upstreams()])
    async with http.post(url + CHAT, json=chat()) as resp:
        assert resp.status == 200
    async with http.get(url + "/stats") as resp:
        stats = await resp.json()
    assert {
        "total_workers",
        "healthy_workers",
        "total_requests",
        "policy",
        "uptime_s",
        "queue_depth",
        "workers",
        "batches",
        "model_switch",
    } == set(stats)
    assert {
        "index",
        "url",
        "healthy",
        "draining",
        "requests_served",
        "errors",
        "in_flight",
        "models",
        "consecutive_failures",
        "last_check",
        "latency_ms_p50",
        "weight",
        "tokens_in_flight",
        "busy_for_s",
        "discovered",
    } == set(stats["workers"][0])
    assert stats["workers"][0]["requests_served"] == 1 and stats["total_requests"] == 1
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    for name in (
        "lb_requests_total",
        "lb_backend_in_flight",
        "lb_backend_healthy",
        "lb_queue_depth",
        "lb_queue_wait_seconds",
        "lb_retries",
        "lb_request_duration_seconds",
        "lb_time_to_first_byte_seconds",
        "lb_overhead_seconds",
    ):
        assert name in text, name
