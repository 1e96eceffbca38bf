"""The worker app in process (`create_app` + aiohttp's TestServer) with engines that misbehave on purpose."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.test_batcher import RecordingEngine
from workers.config import WorkerConfig
from workers.engines.base import TokenEvent
from workers.server import LOAD_TASK, create_app
from workers.state import STATE

Client = TestClient[web.Request, web.Application]


class FailingEngine(RecordingEngine):
    """Raises after the first step of any batch holding a request whose prompt contains "explode"."""

    def step(self) -> list[TokenEvent]:
        if self.steps_of_batch >= 1 and any("explode" in s.request.prompt for s in self._running):
            raise RuntimeError("the GPU caught fire")
        return super().step()


@pytest_asyncio.fixture(loop_scope="function")
async def client() -> AsyncIterator[Client]:
    config = WorkerConfig(engine="fake", batch_size=4, max_wait_time=0.0)
    app = create_app(config, FailingEngine())
    async with TestClient(TestServer(app)) as test_client:
        await app[LOAD_TASK]  # the fake engine loads at once
        assert app[STATE].status == "ok"
        yield test_client


def frames(body: str) -> list[str]:
    return [line.removeprefix("data: ") for line in body.splitlines() if line]


async def test_engine_failure_is_a_500_and_the_next_request_works(client: Client) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "explode now", "max_tokens": 5})
    assert resp.status == 500
    assert (await resp.json())["error"]["code"] == "engine_error"
    resp = await client.post("/v1/completions", json={"prompt": "calm", "max_tokens": 5})
    assert resp.status == 200


async def test_engine_failure_mid_stream_ends_with_an_error_event_and_done(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "explode later"}], "max_tokens": 5, "stream": True})
    assert resp.status == 200  # the stream had started
    got = frames(await resp.text())
    assert got[-1] == "[DONE]"
    assert json.loads(got[-2])["error"]["code"] == "engine_error"
    assert json.loads(got[0])["choices"][0]["delta"]["role"] == "assistant"


async def test_streamed_chat_with_n_opens_every_choice_and_finishes_each(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "two please"}], "max_tokens": 3, "n": 2, "seed": 1,
        "temperature": 1.0, "stream": True, "ignore_eos": True})
    chunks = [json.loads(f) for f in frames(await resp.text())[:-1]]
    opening = [c["choices"][0] for c in chunks[:2]]
    assert [(c["index"], c["delta"]["role"]) for c in opening] == [(0, "assistant"), (1, "assistant")]
    finished = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"][0]["finish_reason"]}
    assert finished == {0: "length", 1: "length"}


async def test_failed_requests_are_counted_by_status(client: Client) -> None:
    await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    text = await (await client.get("/metrics")).text()
    assert 'worker_requests_total{endpoint="completions",model="fake-model",status="400"} 1.0' in text
    assert 'worker_requests_total{endpoint="completions",model="fake-model",status="200"} 1.0' in text


async def test_out_of_memory_lowers_the_batch_cap_reported_in_health_and_metrics() -> None:
    import asyncio

    from tests.test_batcher import OutOfMemoryEngine

    config = WorkerConfig(engine="fake", batch_size=4, max_wait_time=0.2)
    app = create_app(config, OutOfMemoryEngine(oom_above=1))
    async with TestClient(TestServer(app)) as test_client:
        await app[LOAD_TASK]
        body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        answers = await asyncio.gather(*(test_client.post("/v1/completions", json=body) for _ in range(4)))
        assert [a.status for a in answers] == [200] * 4  # no request lost
        health = await (await test_client.get("/health")).json()
        assert (health["batch_size"], health["batch_cap"]) == (4, 1)
        metrics = await (await test_client.get("/metrics")).text()
        assert 'worker_batch_cap{model="fake-model"} 1.0' in metrics
