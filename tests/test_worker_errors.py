"""Bad input gets an OpenAI-style error with the right status, and the worker keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.worker_process import Worker, running_worker

MAX_MODEL_LEN = 64
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GOOD_CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GOOD_COMPLETION = {"prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with running_worker(tmp_path_factory.mktemp("errors"), "--max-model-len", str(MAX_MODEL_LEN)) as w:
        yield w


async def until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.02)


async def post(worker: Worker, path: str, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
        worker.url + path, data=data, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


# (path, body, status, param, code): one row per rule of the bad-input list, plus our own limits
BAD_INPUT: list[tuple[str, Any, int, str | None, str | None]] = [
    (COMPLETIONS, b"{not json", 400, None, None),
    (COMPLETIONS, b"[1, 2]", 400, None, None),
    (COMPLETIONS, {"max_tokens": 2}, 400, "prompt", None),
    (CHAT, {"max_tokens": 2}, 400, "messages", None),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {"messages": "hi"}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]", "unsupported_parameter"),
    (COMPLETIONS, {"prompt": 42}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [1, 2, 3]}, 400, "prompt", "unsupported_parameter"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens",
     "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi " * 62, "max_tokens": 4}, 400, "prompt", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": "hi " * 80}]}, 400, "messages",
     "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-9"}, 404, "model", "model_not_found"),
    (COMPLETIONS, {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    (COMPLETIONS, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", None),
    (COMPLETIONS, {"prompt": "hi", "stop": 5}, 400, "stop", None),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n", None),
    (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    (COMPLETIONS, {"prompt": "hi", "ignore_eos": 1}, 400, "ignore_eos", None),
    (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": "no"}}, 400,
     "stream_options.include_usage", None),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    (COMPLETIONS, {"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty",
     "unsupported_parameter"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    (CHAT, {**GOOD_CHAT, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
    (CHAT, {**GOOD_CHAT, "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported_parameter"),
    (CHAT, {**GOOD_CHAT, "mirostat": 2}, 400, "mirostat", "unsupported_parameter"),
    ("/generate", {"prompt": "hi", "do_sample": "maybe"}, 400, "do_sample", None),
    ("/generate", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens", None),
    ("/generate", {"prompt": "hi", "frequency_penalty": 0}, 400, "frequency_penalty",
     "unsupported_parameter"),
    ("/generate", {"max_new_tokens": 3}, 400, "prompt", None),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_INPUT)
async def test_bad_input_gets_an_openai_error_and_the_next_request_works(
    worker: Worker, path: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    got_status, error, _ = await post(worker, path, body)
    assert got_status == status, error
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["message"]
    assert error["error"]["param"] == param
    if code is not None:
        assert error["error"]["code"] == code
    good = GOOD_CHAT if path == CHAT else GOOD_COMPLETION
    ok_status, _, _ = await post(worker, path if path != "/generate" else COMPLETIONS, good)
    assert ok_status == 200


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "max_tokens": 2, "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": None,
     "user": "someone", "echo": False, "best_of": 1, "suffix": None, "top_k": -1},
    {"prompt": "hi", "max_tokens": 2, "repetition_penalty": 1.0, "logprobs": None, "ignore_eos": True,
     "stream": True, "stream_options": {"include_usage": True}},  # what `vllm bench serve` sends
])
async def test_harmless_parameters_at_their_neutral_value_are_accepted(worker: Worker, body: Any) -> None:
    async with aiohttp.ClientSession() as session, session.post(worker.url + COMPLETIONS, json=body) as resp:
        assert resp.status == 200, await resp.text()


async def test_wrong_method_and_unknown_path_get_json_errors(worker: Worker) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(worker.url + COMPLETIONS) as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
        async with session.post(worker.url + "/v1/embeddings", json={}) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"


async def test_openai_sdk_sees_a_bad_request_error(worker: Worker) -> None:
    async with openai.AsyncOpenAI(base_url=worker.url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="fake-model", prompt="hi", max_tokens=0)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="other-model", prompt="hi", max_tokens=2)
    assert info.value.status_code == 400


async def test_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    flags = ("--batch-size", "1", "--max-queue", "1", "--max-wait-time", "0", "--fake-step-latency", "0.02")
    with running_worker(tmp_path, *flags) as w:
        long = {"prompt": "occupy", "max_tokens": 500, "ignore_eos": True}
        running = asyncio.create_task(post(w, COMPLETIONS, long))
        await until(lambda: w.get_json("/health")[1]["running"] == 1)  # one being tokenised counts as queued
        queued = asyncio.create_task(post(w, COMPLETIONS, long))
        await until(lambda: w.get_json("/health")[1]["queue_depth"] == 1)
        status, error, headers = await post(w, COMPLETIONS, GOOD_COMPLETION)
        assert status == 429
        assert error["error"]["type"] == "rate_limit_error"
        assert int(headers["Retry-After"]) >= 1
        for task in (running, queued):
            task.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
