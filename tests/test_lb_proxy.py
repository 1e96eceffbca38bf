"""Proxy behaviour over real sockets: the balancer (create_app) before scriptable in-process upstreams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from lb.app import POOL, create_app
from lb.config import BalancerConfig
from lb.settings import from_mapping
from tests.lb_upstream import Upstream
from tests.processes import free_port

Balancer = Callable[..., Awaitable[str]]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every proxy test runs on both loops: the balancer ships on uvloop, whose transports differ."""
    if request.param == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


@pytest_asyncio.fixture(loop_scope="function")
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def _start(model: str = "tiny") -> Upstream:
        upstream = await Upstream(model).start()
        started.append(upstream)
        return upstream

    yield _start
    for upstream in started:
        await upstream.stop()


@pytest_asyncio.fixture(loop_scope="function")
async def balancer() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []
    apps: list[web.Application] = []

    async def _start(workers: list[Upstream] | list[str], **settings: Any) -> str:
        urls = [w if isinstance(w, str) else w.url for w in workers]
        values = {"workers": urls, "health_check_interval": 0.2, "health_check_timeout": 0.5, **settings}
        config = from_mapping(BalancerConfig, values)
        app = create_app(config)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        apps.append(app)
        return f"http://127.0.0.1:{port}"

    _start.apps = apps  # type: ignore[attr-defined]
    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="function")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def test_forwards_and_labels_the_worker(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await upstreams(), await upstreams()
    url = await balancer([a, b], policy="round_robin")
    workers = []
    for _ in range(4):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.status == 200
            assert (await resp.json())["choices"][0]["message"]["content"] == "hi"
            assert resp.headers["X-LB-Retries"] == "0"
            workers.append(resp.headers["X-LB-Worker"])
    assert workers == ["0", "1", "0", "1"]
    assert a.bodies[0] == json.dumps(chat()).encode()  # the body passes through byte for byte


async def test_sse_chunks_are_not_buffered(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer([up])
    async with http.post(url + CHAT, json=chat(stream=True, hold=True)) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert b"t0" in first  # arrived while the upstream still holds the rest of the stream
        up.release.set()
        rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_retries_a_503_on_another_backend(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    draining, ok = await upstreams(), await upstreams()
    url = await balancer([draining, ok], policy="round_robin")
    draining.status = 503
    for _ in range(4):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.status == 200
            assert resp.headers["X-LB-Worker"] == "1"
    assert draining.requests >= 1


async def test_refused_connection_is_retried_and_marks_backend_down(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    dead, ok = await upstreams(), await upstreams()
    url = await balancer([dead, ok], policy="round_robin", health_check_interval=30)
    await dead.stop()
    for _ in range(4):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.status == 200 and resp.headers["X-LB-Worker"] == "1"
    async with http.get(url + "/stats") as resp:
        stats = await resp.json()
    assert [w["healthy"] for w in stats["workers"]] == [False, True]


async def test_upstream_dying_mid_stream_ends_with_error_event(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer([up])
    async with http.post(url + CHAT, json=chat(stream=True, die_after=2)) as resp:
        assert resp.status == 200
        body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert b"t0" in events[0] and b"t1" in events[1]
    assert json.loads(events[-1][len(b"data: ") :])["error"]["code"] == "upstream_disconnected"


async def test_client_disconnect_cancels_upstream_and_releases_in_flight(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer([up])
    backend = balancer.apps[0][POOL].backends[0]
    resp = await http.post(url + CHAT, json=chat(stream=True, hold=True))
    await resp.content.readuntil(b"\n\n")
    assert backend.in_flight == 1
    resp.close()  # the client goes away mid-stream
    for _ in range(100):
        if up.cancelled and backend.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert up.cancelled == 1 and up.finished == 0
    assert backend.in_flight == 0


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
    } == set(stats)
    assert {
        "index",
        "url",
        "healthy",
        "requests_served",
        "errors",
        "in_flight",
        "models",
        "consecutive_failures",
        "last_check",
        "latency_ms_p50",
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


async def test_large_body_is_streamed_through(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer([up])
    payload = json.dumps(chat() | {"padding": "x" * (3 << 20)}).encode()  # over the 1 MiB kept for retries

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 256 << 10):
            yield payload[start : start + (256 << 10)]

    async with http.post(url + CHAT, data=pieces(), headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200
    assert up.bodies[-1] == payload


async def test_full_worker_429_is_retried_elsewhere(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    full, ok = await upstreams(), await upstreams()
    url = await balancer([full, ok], policy="round_robin")
    full.status = 429
    for _ in range(3):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.status == 200 and resp.headers["X-LB-Worker"] == "1"
    async with http.get(url + "/stats") as resp:
        assert (await resp.json())["workers"][0]["healthy"]  # full is not dead


@pytest.mark.parametrize("cap", [None, 2])
async def test_in_flight_counts_never_drift_under_mixed_load(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, cap: int | None
) -> None:
    ups = [await upstreams() for _ in range(3)]
    ups[0].status = 503  # every attempt there is retried elsewhere
    for up in ups:
        up.chunks = 20
    settings = {"max_inflight_per_worker": cap, "max_queue": 1000} if cap else {}
    url = await balancer(ups, policy="power_of_two", **settings)
    pool = balancer.apps[0][POOL]

    async def one(i: int) -> None:
        body = chat(stream=i % 2 == 0)
        try:
            async with asyncio.timeout(0.005 * (i % 7) if i % 3 == 0 else 30):  # a third leave early
                async with http.post(url + CHAT, json=body) as resp:
                    await resp.read()
        except TimeoutError:
            pass

    await asyncio.gather(*(one(i) for i in range(150)))
    for _ in range(100):
        if all(b.in_flight == 0 and b.reserved == 0 for b in pool.backends):
            break
        await asyncio.sleep(0.02)
    assert [(b.in_flight, b.reserved) for b in pool.backends] == [(0, 0)] * 3
    assert sum(b.requests_served for b in pool.backends) > 0
