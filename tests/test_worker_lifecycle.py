"""Worker lifecycle over real processes: loading, health while busy, disconnects, SIGTERM drain, bad flags."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests import processes
from tests.worker_process import Worker, running_worker

LONG = {"prompt": "keep going", "max_tokens": 3000, "ignore_eos": True}


async def wait_for(predicate, limit: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def running(worker: Worker) -> int:
    return int(worker.get_json("/health")[1]["running"])


async def test_health_is_503_loading_until_the_engine_is_ready(tmp_path: Path) -> None:
    with running_worker(tmp_path, "--fake-load-latency", "3", wait_ready=False) as w:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):  # the port is bound before loading starts
                try:
                    async with session.get(w.url + "/health") as resp:
                        status, body = resp.status, await resp.json()
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            assert (status, body["status"]) == (503, "loading")
            async with session.post(w.url + "/v1/completions", json={"prompt": "early"}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "not_ready"
        w.proc.wait_http_ok(w.url + "/health", timeout=30)
        assert w.get_json("/health")[1]["status"] == "ok"


async def test_health_answers_fast_while_a_batch_generates(tmp_path: Path) -> None:
    with running_worker(tmp_path, "--fake-step-latency", "0.05", "--fake-per-seq-latency", "0.01") as w:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "busy", "max_tokens": 30, "ignore_eos": True}
            busy = [asyncio.create_task(session.post(w.url + "/v1/completions", json=body)) for _ in range(8)]
            await wait_for(lambda: running(w) == 8)
            slowest = 0.0
            for _ in range(10):
                started = time.monotonic()
                async with session.get(w.url + "/health") as resp:
                    assert resp.status == 200
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 0.5  # generous: the engine thread never blocks the event loop
            for resp in await asyncio.gather(*busy):
                assert resp.status == 200
                resp.release()


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_frees_its_batch_slot(tmp_path: Path, stream: bool) -> None:
    with running_worker(tmp_path, "--fake-step-latency", "0.01") as w:
        async with aiohttp.ClientSession() as session:
            if stream:
                resp = await session.post(w.url + "/v1/completions", json={**LONG, "stream": True})
                await resp.content.readline()  # the first chunk arrived: the request is in the batch
                await wait_for(lambda: running(w) == 1)
                resp.close()  # drop the connection mid-stream
            else:
                task = asyncio.create_task(session.post(w.url + "/v1/completions", json=LONG))
                await wait_for(lambda: running(w) == 1)
                task.cancel()  # aborts the request and closes its connection
                await asyncio.gather(task, return_exceptions=True)
        await wait_for(lambda: running(w) == 0, limit=5)
        tokens = w.metric("worker_generated_tokens_total")
        await asyncio.sleep(0.3)
        assert w.metric("worker_generated_tokens_total") == tokens  # it stopped costing compute
        assert tokens < 3000


async def test_sigterm_finishes_running_requests_then_exits_zero(tmp_path: Path) -> None:
    with running_worker(tmp_path, "--fake-step-latency", "0.02") as w:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "finish me", "max_tokens": 50, "ignore_eos": True, "stream": True}
            async with session.post(w.url + "/v1/completions", json=body) as resp:
                await resp.content.readline()
                w.proc.signal(signal.SIGTERM)
                frames = [line.removeprefix("data: ") for line in (await resp.text()).splitlines() if line]
            assert frames[-1] == "[DONE]"
            chunks = [json.loads(f) for f in frames[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert w.proc.popen.wait(timeout=15) == 0
        assert "drained: every request finished" in w.proc.log_tail()


async def test_sigterm_cuts_off_requests_after_the_drain_timeout(tmp_path: Path) -> None:
    with running_worker(tmp_path, "--fake-step-latency", "0.01", "--drain-timeout", "0.5") as w:
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(session.post(w.url + "/v1/completions", json=LONG))
            await wait_for(lambda: running(w) == 1)
            started = time.monotonic()
            w.proc.signal(signal.SIGTERM)
            code = await asyncio.to_thread(w.proc.popen.wait, 15)
            assert code == 0
            assert time.monotonic() - started < 10
            await asyncio.gather(task, return_exceptions=True)
        assert "drain deadline passed" in w.proc.log_tail()


async def test_draining_worker_refuses_new_requests_with_503(tmp_path: Path) -> None:
    with running_worker(tmp_path, "--fake-step-latency", "0.02", "--drain-timeout", "10") as w:
        async with aiohttp.ClientSession() as session:
            long = asyncio.create_task(session.post(w.url + "/v1/completions",
                                                    json={**LONG, "max_tokens": 100}))
            await wait_for(lambda: running(w) == 1)
            # a kept-alive connection opened before SIGTERM can still reach the draining worker
            async with session.get(w.url + "/health") as resp:
                assert resp.status == 200
            w.proc.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with session.get(w.url + "/health") as resp:
                assert (resp.status, (await resp.json())["status"]) == (503, "draining")
            (await long).release()
        assert w.proc.popen.wait(timeout=15) == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--engine", "hf"], "model_path"),
    (["--engine", "fake", "--batch-size", "0"], "batch_size"),
    (["--engine", "fake", "--port", "0"], "port"),
    (["--engine", "tpu"], "--engine"),
])
def test_bad_flags_exit_2_naming_the_setting(flags: list[str], message: str) -> None:
    result = subprocess.run(processes.python_module("workers", *flags), env=processes.test_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


async def test_sigterm_while_loading_exits_zero(tmp_path: Path) -> None:
    with running_worker(tmp_path, "--fake-load-latency", "2", wait_ready=False) as w:
        await wait_for(lambda: "listening on" in w.proc.log_tail(), limit=30)
        w.proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(w.proc.popen.wait, 30) == 0


def test_engine_that_fails_to_load_exits_1_saying_why(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with running_worker(tmp_path, "--engine", "hf", "--model-path", str(missing), wait_ready=False) as w:
        assert w.proc.popen.wait(timeout=120) == 1
        log = w.proc.log_tail(80)
    assert "loading the engine failed" in log
    assert "the engine could not be loaded" in log
