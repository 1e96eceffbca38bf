"""The worker's POST /admin/load (swap in place: drain first, guarded like the balancer's admin API) and its
GET /version and GET /info, on fake-engine workers (the swap logic is the same for every engine)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from tests.worker_process import Worker, running_worker

TOKEN = "s3cret-admin-token"
SLOW = ("--fake-step-latency", "0.05", "--max-wait-time", "0")  # 40 tokens take about 2 s


def post(worker: Worker, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(worker.url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    flags = ("--served-model-name", "old", "--admin-token", TOKEN, "--drain-timeout", "10", *SLOW)
    with running_worker(tmp_path_factory.mktemp("admin"), *flags) as w:
        yield w


async def test_load_lets_running_requests_finish_then_serves_the_new_model(worker: Worker) -> None:
    async with AsyncOpenAI(base_url=worker.url + "/v1", api_key="x", max_retries=0, timeout=60) as sdk:
        running = asyncio.create_task(sdk.completions.create(
            model="old", prompt="a long one", max_tokens=40, extra_body={"ignore_eos": True}))
        await asyncio.sleep(0.5)  # generating now
        new = {"model_path": "/models/new", "served_model_name": "new"}
        status, record = await asyncio.to_thread(post, worker, "/admin/load?wait=1", new, TOKEN)
        finished = await running
    assert status == 200 and record["state"] == "loaded" and record["drained"] is True
    assert finished.model == "old" and finished.usage is not None and finished.usage.completion_tokens == 40
    status, health = worker.get_json("/health")
    assert status == 200 and health["model"] == "new" and health["load"]["id"] == record["id"]
    status, body = worker.get_json("/v1/models")
    assert [m["id"] for m in body["data"]] == ["new"]


def test_load_needs_the_admin_token(worker: Worker) -> None:
    status, body = post(worker, "/admin/load", {"model_path": "/models/x"})
    assert status == 401 and body["error"]["code"] == "invalid_admin_token"
    status, body = post(worker, "/admin/load", {"model_path": "/models/x"}, token="wrong")
    assert status == 401


def test_bad_load_requests_are_refused_before_anything_stops(worker: Worker) -> None:
    for body, fragment in [({"model_path": "/m", "colour": "red"}, "unknown key"),
                           ({"served_model_name": "x"}, "model_path"),
                           ({"model_path": "/m", "quantization": "3bit"}, "quantization"),
                           ([1, 2], "JSON object")]:
        status, answer = post(worker, "/admin/load", body, TOKEN)
        assert status == 400 and fragment in answer["error"]["message"], answer
    assert worker.get_json("/health")[0] == 200


async def test_a_second_load_while_one_runs_is_a_conflict(worker: Worker) -> None:
    async with AsyncOpenAI(base_url=worker.url + "/v1", api_key="x", max_retries=0, timeout=60) as sdk:
        model = worker.get_json("/health")[1]["model"]
        running = asyncio.create_task(sdk.completions.create(  # keeps the first swap draining for ~2 s
            model=model, prompt="a long one", max_tokens=40, extra_body={"ignore_eos": True}))
        await asyncio.sleep(0.3)
        to_a = {"model_path": "/m/a", "served_model_name": "a"}
        status, first = await asyncio.to_thread(post, worker, "/admin/load", to_a, TOKEN)
        assert status == 202 and first["state"] == "loading"
        status, body = await asyncio.to_thread(post, worker, "/admin/load", {"model_path": "/m/b"}, TOKEN)
        await running
    assert status == 409 and body["error"]["code"] == "swap_in_progress"
    deadline = time.monotonic() + 30
    while worker.get_json("/health")[1].get("model") != "a":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_a_request_longer_than_the_drain_timeout_is_cut_off(tmp_path: Path) -> None:
    with running_worker(tmp_path, "--served-model-name", "old", "--drain-timeout", "0.3", *SLOW) as worker:
        sdk = AsyncOpenAI(base_url=worker.url + "/v1", api_key="x", max_retries=0, timeout=60)
        async with sdk:
            running = asyncio.create_task(sdk.completions.create(
                model="old", prompt="a long one", max_tokens=200, extra_body={"ignore_eos": True}))
            await asyncio.sleep(0.3)
            new = {"model_path": "/m/new"}
            status, record = await asyncio.to_thread(post, worker, "/admin/load?wait=1", new)
            (outcome,) = await asyncio.gather(running, return_exceptions=True)
    assert status == 200 and record["drained"] is False  # loopback: no token needed without --admin-token
    assert isinstance(outcome, Exception)  # cut off, not left running into the new model


def test_version_and_info_describe_the_worker_without_its_secrets(worker: Worker) -> None:
    status, version = worker.get_json("/version")
    assert status == 200 and version["api"] and version["python"].count(".") == 2
    assert {"torch", "transformers", "cuda"} <= version.keys()
    with urllib.request.urlopen(worker.url + "/info", timeout=10) as resp:
        raw = resp.read().decode()
    info = json.loads(raw)
    assert info["config"]["engine"] == "fake" and info["config"]["batch_size"] == 8
    assert info["config"]["admin_token"] == "***" and TOKEN not in raw
    assert info["versions"] == version
