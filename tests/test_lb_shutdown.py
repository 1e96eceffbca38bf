"""Balancer shutdown: readiness turns 503 while liveness stays 200, queued requests are refused, streams cut
at the drain deadline end with an SSE error event, and a second signal exits at once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import SpawnFn
from tests.lb_cluster import Proc, start_lb
from tests.processes import ManagedProcess, free_port, python_module

CHAT = "/v1/chat/completions"
STEP_S = 0.05  # the fake worker's seconds per token: a 200-token stream runs ~10 s


@pytest.fixture(scope="module")
def slow_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """One fake worker for the whole module (each test starts, and stops, its own balancer)."""
    port = free_port()
    cmd = python_module(
        "workers",
        "--engine",
        "fake",
        "--port",
        str(port),
        "--max-wait-time",
        "0",
        "--fake-step-latency",
        str(STEP_S),
        "--log-level",
        "warning",
    )
    proc = ManagedProcess(cmd, tmp_path_factory.mktemp("worker") / "worker.log")
    worker = Proc(proc, port)
    try:
        proc.wait_http_ok(worker.url + "/health")
        yield worker
    finally:
        proc.stop()


def chat(max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def first_event(resp: aiohttp.ClientResponse) -> bytes:
    """Read until the stream's first `data:` line, so the request is surely running on the worker."""
    while True:
        line = await resp.content.readline()
        if line.startswith(b"data:"):
            return line


async def wait_exit(lb: Proc, timeout: float) -> int | None:  # noqa: ASYNC109 - a deadline for the process
    deadline = time.monotonic() + timeout
    while lb.proc.popen.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - a child process
        await asyncio.sleep(0.05)
    return lb.proc.popen.poll()


async def test_health_turns_503_while_draining_and_livez_stays_200(spawn: SpawnFn, slow_worker: Proc) -> None:
    lb = start_lb(spawn, [slow_worker], "--drain-timeout", "60")
    async with aiohttp.ClientSession() as http:
        async with http.get(lb.url + "/health") as before:
            assert before.status == 200
        async with http.post(lb.url + CHAT, json=chat(200, stream=True)) as running:
            await first_event(running)
            lb.proc.signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with http.get(lb.url + "/health") as health:
                assert health.status == 503 and (await health.json())["status"] == "draining"
            async with http.get(lb.url + "/livez") as live:
                assert live.status == 200 and (await live.json())["draining"] is True
            async with http.post(lb.url + CHAT, json=chat(2)) as refused:
                body = await refused.json()
                assert refused.status == 503 and body["error"]["code"] == "shutting_down"
                assert refused.headers["Retry-After"]
            assert lb.proc.popen.poll() is None  # the stream still runs: the balancer waits for it
    # the client closed the stream: nothing is in flight any more, so the drain ends long before its 60 s
    assert await wait_exit(lb, 30) == 0, lb.proc.log_tail()


async def test_queued_request_gets_503_at_shutdown(spawn: SpawnFn, slow_worker: Proc) -> None:
    lb = start_lb(
        spawn, [slow_worker], "--max-inflight-per-worker", "1", "--max-queue", "4", "--drain-timeout", "20"
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(lb.url + CHAT, json=chat(200, stream=True)) as holder:
            await first_event(holder)  # the worker's only slot is taken for ~10 s
            queued = asyncio.create_task(http.post(lb.url + CHAT, json=chat(2)))
            await asyncio.sleep(0.5)
            assert not queued.done()
            lb.proc.signal(signal.SIGTERM)
            started = time.monotonic()
            async with await asyncio.wait_for(queued, 5) as reply:
                body = await reply.json()
            # answered at once, while the holder still runs (it would otherwise get the slot in ~10 s)
            assert reply.status == 503 and body["error"]["code"] == "shutting_down"
            assert time.monotonic() - started < 6
        assert await wait_exit(lb, 30) == 0, lb.proc.log_tail()


@pytest.mark.parametrize("front", ["--fast-front", "--no-fast-front"])
async def test_stream_cut_at_the_drain_deadline_ends_with_an_sse_error_event(
    spawn: SpawnFn, slow_worker: Proc, front: str
) -> None:
    lb = start_lb(spawn, [slow_worker], "--drain-timeout", "1", front)
    async with (
        aiohttp.ClientSession() as http,
        http.post(lb.url + CHAT, json=chat(200, stream=True)) as stream,
    ):
        await first_event(stream)
        lb.proc.signal(signal.SIGTERM)
        # read to the end: a bare close would raise ClientPayloadError here (chunked body cut short)
        body = await asyncio.wait_for(stream.read(), 10)
    events = [line[len(b"data: ") :] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events and events[-1] != b"[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "shutting_down" and "drain deadline" in error["message"]
    assert len(events) < 150  # cut after ~1 s of a ~10 s stream
    assert await wait_exit(lb, 30) == 0, lb.proc.log_tail()


async def test_second_signal_exits_at_once(spawn: SpawnFn, slow_worker: Proc, tmp_path: Path) -> None:
    lb = start_lb(spawn, [slow_worker], "--drain-timeout", "30")
    async with (
        aiohttp.ClientSession() as http,
        http.post(lb.url + CHAT, json=chat(200, stream=True)) as stream,
    ):
        await first_event(stream)
        lb.proc.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert lb.proc.popen.poll() is None  # draining: it would wait up to 30 s for the stream
        lb.proc.signal(signal.SIGINT)
        assert await wait_exit(lb, 10) == 1  # not the 30 s drain
    assert "second signal (SIGINT) while draining: exiting now" in lb.proc.log_path.read_text()


async def test_shutdown_fails_client_waiters_but_keeps_batch_lines_queued() -> None:
    from lb.admission import Admission
    from lb.backends import BackendPool
    from lb.errors import ShuttingDown
    from lb.policies import RoundRobin

    pool = BackendPool()
    backend = pool.add("http://127.0.0.1:1")
    pool.set_health(backend, True)
    admission = Admission(pool, RoundRobin(), max_inflight_per_worker=1, max_queue=4, queue_timeout=30)
    async with pool.track(backend):
        client = asyncio.create_task(admission.choose(lambda: pool.routable))
        line = asyncio.create_task(admission.choose(lambda: pool.routable, bulk=True, patient=True))
        await asyncio.sleep(0)
        assert admission.fail_all(ShuttingDown("bye")) == 1
        with pytest.raises(ShuttingDown):
            await client
        assert not line.done()  # a batch line failed now would be recorded as failed, not resumed later
    assert await asyncio.wait_for(line, 1) is backend
