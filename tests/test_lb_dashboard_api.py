"""The dashboard's balancer API in process: /cluster (background telemetry), /config, /logs, drain / readmit,
X-Request-ID and traceparent, over real sockets with an in-process worker app or scripted upstreams."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from lb.latency import RecentRequests, percentile
from lb.telemetry import engine_figures, parse_metrics
from tests.lb_upstream import chat
from tests.processes import free_port, test_env
from workers.config import WorkerConfig
from workers.engines import create_engine
from workers.server import LOAD_TASK, create_app

CHAT = "/v1/chat/completions"
VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_waiting{engine="0",model_name="qwen"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.25
vllm:generation_tokens_total{engine="0",model_name="qwen"} 1234.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="qwen"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="qwen"} 0.5
vllm:time_to_first_token_seconds_count{engine="0",model_name="qwen"} 4.0
"""


@pytest_asyncio.fixture(loop_scope="function")
async def worker() -> AsyncIterator[str]:
    """A real worker app (fake engine) on a real port, in this process."""
    app = create_app(
        WorkerConfig(engine="fake", max_wait_time=0.0), create_engine(WorkerConfig(engine="fake"))
    )
    server = TestServer(app, port=free_port())
    await server.start_server()
    await app[LOAD_TASK]
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_vllm_metric_names_give_the_engine_figures() -> None:
    figures = engine_figures(parse_metrics(VLLM_METRICS))
    assert figures == {
        "running": 3.0,
        "waiting": 7.0,
        "kv_cache_usage": 0.25,
        "generated_tokens": 1234.0,
        "ttft_sum": 0.5,
        "ttft_count": 4.0,
    }


def test_recent_requests_give_percentiles_per_backend_and_overall() -> None:
    recent = RecentRequests()
    for i in range(1, 101):
        recent.record(i % 2, ttfb=0.001, total=i / 1000, status=500 if i == 100 else 200)
    overall, by_backend = recent.window(60)
    assert (overall.requests, overall.errors) == (100, 1)
    assert (overall.latency_ms_p50, overall.latency_ms_p99) == (50.0, 99.0)
    assert by_backend[1].requests == 50 and by_backend[1].latency_ms_p99 == 99.0
    assert percentile([], 50) is None


async def test_cluster_shows_engine_load_tokens_and_system_read_from_the_worker(
    worker: str, balancer: Any, http: aiohttp.ClientSession
) -> None:
    url = await balancer([worker], telemetry_interval=0.2)
    for _ in range(5):
        async with http.post(url + CHAT, json={**chat(), "model": "fake-model", "max_tokens": 8}) as resp:
            assert resp.status == 200

    async def gathered() -> bool:
        async with http.get(url + "/cluster") as resp:
            w = (await resp.json())["workers"][0]
        # a round whose /metrics read began before the last request ended still shows it running
        idle = w["engine"]["running"] == 0 and w["engine"]["waiting"] == 0
        return (
            bool(w["engine"]["generated_tokens"])
            and w["recent"]["requests"] == 5
            and idle
            and bool(w["system"])
        )

    await wait_for(gathered)
    async with http.get(url + "/cluster") as resp:
        doc = await resp.json()
    w = doc["workers"][0]
    assert w["state"] == "healthy" and w["models"] == ["fake-model"]
    assert w["engine"]["generated_tokens"] >= 5 * 8  # the worker's own counter, not the balancer's
    assert w["system"]["ram_total_gb"] > 0 and w["gpu"]["available"] is False
    assert doc["balancer"]["recent"]["requests"] == 5 and doc["balancer"]["recent"]["latency_ms_p99"] > 0
    assert len(doc["history"]["t"]) >= 1 and set(doc["history"]) >= {"tokens_per_s", "queue_depth"}


async def test_cluster_and_page_answer_at_once_while_a_worker_hangs(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    """A worker that accepts connections and never answers: the gatherer's reads of it time out in the
    background; /cluster and /dashboard never wait for them."""
    held: list[asyncio.StreamWriter] = []

    async def accept_and_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    hung = await asyncio.start_server(accept_and_hang, "127.0.0.1", 0)
    hung_url = f"http://127.0.0.1:{hung.sockets[0].getsockname()[1]}"
    ok = await upstreams()
    url = await balancer([ok, hung_url], telemetry_interval=0.5, health_check_timeout=2.0)
    try:
        await asyncio.sleep(0.6)  # a gathering round is under way, its reads of the hung worker pending
        for path in ["/cluster", "/dashboard"] * 5:
            started = time.monotonic()
            async with http.get(url + path) as resp:
                assert resp.status == 200
                await resp.read()
            assert time.monotonic() - started < 0.2, path

        async def timed_out() -> bool:
            async with http.get(url + "/cluster") as resp:
                doc = await resp.json()
            return "timed out" in (doc["workers"][1]["telemetry_error"] or "")

        await wait_for(timed_out)
    finally:
        for writer in held:
            writer.close()
        hung.close()


async def test_config_shows_settings_with_secrets_masked(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    up = await upstreams()
    url = await balancer(
        [up], api_key=("sk-client-secret-1",), admin_token="admin-secret-2", worker_api_key="wk-secret-3"
    )
    async with http.get(url + "/config") as resp:
        text = await resp.text()
        config = await resp.json()
    assert "sk-client-secret-1" not in text and "admin-secret-2" not in text and "wk-secret-3" not in text
    assert config["worker_api_key"] == "********"
    assert config["admin_token"] == "********" and config["api_key"] == ["********"]
    assert config["workers"] == [up.url] and config["policy"] == "least_connections"


@pytest.fixture
def log_files(tmp_path: Path) -> dict[str, Path]:
    paths = {"balancer": tmp_path / "lb.log", "worker-0": tmp_path / "worker-0.log"}
    for name, path in paths.items():
        path.write_text("".join(f"{name} line {i}\n" for i in range(1, 1001)))
    return paths


async def test_logs_give_the_last_lines_of_a_named_component(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, log_files: dict[str, Path]
) -> None:
    up = await upstreams()
    entries = tuple(f"{name}={path}" for name, path in log_files.items())
    url = await balancer([up], log_file=entries)
    async with http.get(url + "/logs/worker-0?lines=3") as resp:
        assert resp.status == 200
        assert await resp.text() == "worker-0 line 998\nworker-0 line 999\nworker-0 line 1000\n"
    async with http.get(url + "/logs") as resp:
        assert (await resp.json())["components"] == ["balancer", "worker-0"]
    async with http.get(url + "/logs/balancer?lines=0") as resp:
        assert resp.status == 400


@pytest.mark.parametrize(
    "path",
    ["/logs/../../etc/passwd", "/logs/..%2F..%2Fetc%2Fpasswd", "/logs/worker-9", "/logs/%2Fetc%2Fpasswd"],
)
async def test_logs_refuse_paths_and_unknown_components_with_404(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, log_files: dict[str, Path], path: str
) -> None:
    up = await upstreams()
    url = await balancer([up], log_file=(f"balancer={log_files['balancer']}",))
    async with http.get(URL(url + path, encoded=True)) as resp:
        assert resp.status == 404
        body = await resp.text()
    assert "root:" not in body and "line 1000" not in body


async def test_logs_need_the_admin_token_when_one_is_set(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, log_files: dict[str, Path]
) -> None:
    up = await upstreams()
    url = await balancer([up], admin_token="t0k", log_file=(f"balancer={log_files['balancer']}",))
    async with http.get(url + "/logs/balancer") as resp:
        assert resp.status == 401
    async with http.get(url + "/logs/balancer", headers={"Authorization": "Bearer t0k"}) as resp:
        assert resp.status == 200


async def test_drain_stops_new_requests_and_readmit_brings_them_back(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    a, b = await upstreams(), await upstreams()
    url = await balancer([a, b], policy="round_robin", admin_token="t0k")
    async with http.post(url + "/workers/0/drain") as resp:
        assert resp.status == 401  # the dashboard's buttons follow the admin API's rule
    auth = {"Authorization": "Bearer t0k"}
    async with http.post(url + "/workers/0/drain", headers=auth) as resp:
        assert resp.status == 200 and (await resp.json())["draining"] is True
    async with http.get(url + "/stats") as resp:
        assert [w["draining"] for w in (await resp.json())["workers"]] == [True, False]
    for _ in range(4):
        async with http.post(url + CHAT, json=chat()) as resp:
            assert resp.headers["X-LB-Worker"] == "1"
    async with http.post(url + "/workers/0/readmit", headers=auth) as resp:
        assert resp.status == 200 and (await resp.json())["draining"] is False
    seen = set()
    for _ in range(4):
        async with http.post(url + CHAT, json=chat()) as resp:
            seen.add(resp.headers["X-LB-Worker"])
    assert seen == {"0", "1"}
    async with http.post(url + "/workers/7/drain", headers=auth) as resp:
        assert resp.status == 404


@pytest.mark.parametrize("fast_front", [True, False])
async def test_request_id_goes_to_the_worker_and_back(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession, fast_front: bool
) -> None:
    up = await upstreams()
    url = await balancer([up], fast_front=fast_front)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with http.post(
        url + CHAT, json=chat(), headers={"X-Request-ID": "req-42", "traceparent": parent}
    ) as r:
        assert r.headers["X-Request-ID"] == "req-42"
    assert up.headers[-1]["X-Request-ID"] == "req-42"
    assert up.headers[-1]["traceparent"] == parent  # W3C trace context passes through untouched
    async with http.post(url + CHAT, json=chat(stream=True)) as r:
        await r.read()
        made = r.headers["X-Request-ID"]
    assert len(made) == 32 and up.headers[-1]["X-Request-ID"] == made  # a new id, the same at both ends


def test_without_an_otlp_endpoint_nothing_of_opentelemetry_is_imported() -> None:
    code = (
        "import sys; from lb.app import create_app; from lb.config import BalancerConfig; "
        "import lb.__main__; create_app(BalancerConfig()); "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=test_env(), check=True
    )
    assert out.stdout.strip() == "[]"


async def test_each_request_is_a_span_under_the_clients_trace_at_the_otlp_collector(
    upstreams: Any, balancer: Any, http: aiohttp.ClientSession
) -> None:
    pytest.importorskip(
        "opentelemetry.exporter.otlp.proto.http", reason="the optional opentelemetry packages"
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    collector = web.Application()
    collector.router.add_post("/v1/traces", collect)
    server = TestServer(collector, port=free_port())
    await server.start_server()
    try:
        up = await upstreams()
        url = await balancer([up], otlp_endpoint=f"http://127.0.0.1:{server.port}")
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-ID": "traced-1"}
        async with http.post(url + CHAT, json=chat(), headers=headers) as resp:
            assert resp.status == 200

        async def exported() -> bool:
            return bool(received)

        await wait_for(exported)
        spans = []
        for raw in received:
            export = ExportTraceServiceRequest.FromString(raw)
            spans += [s for rs in export.resource_spans for ss in rs.scope_spans for s in ss.spans]
        (span,) = spans
        attributes = {a.key: a.value for a in span.attributes}
        assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent_id
        assert attributes["lb.request_id"].string_value == "traced-1"
        assert attributes["lb.worker"].int_value == 0 and attributes["lb.retries"].int_value == 0
        assert attributes["http.response.status_code"].int_value == 200
    finally:
        await server.close()
