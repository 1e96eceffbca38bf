"""The worker's HTTP API over real HTTP against a fake-engine worker process, OpenAI SDK as client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionMessageParam

from tests.worker_process import Worker, running_worker
from workers.engines.fake import fake_eos_position


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with running_worker(tmp_path_factory.mktemp("api"), "--served-model-name", "tiny-fake",
                        env={"CUDA_VISIBLE_DEVICES": "3"}) as w:
        yield w


@pytest_asyncio.fixture(loop_scope="function")  # the test's own loop, not the session's
async def client(worker: Worker) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_health_reports_identity_and_load(worker: Worker) -> None:
    status, body = worker.get_json("/health")
    assert status == 200
    assert body["status"] == "ok"
    assert (body["model"], body["engine"], body["device"]) == ("tiny-fake", "fake", "cpu")
    assert body["cuda_visible_devices"] == "3"
    assert body["gpu"] is None
    assert (body["queue_depth"], body["running"]) == (0, 0)
    assert body["pid"] == worker.proc.pid


async def test_models_lists_the_served_name(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny-fake"]


async def test_greedy_completion_is_deterministic_with_usage(client: openai.AsyncOpenAI) -> None:
    first = await client.completions.create(model="tiny-fake", prompt="one two three", max_tokens=6,
                                            temperature=0)
    second = await client.completions.create(model="tiny-fake", prompt=["one two three"], max_tokens=6,
                                             temperature=0)
    assert first.choices[0].text == second.choices[0].text
    assert len(first.choices[0].text.split()) == 6
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (3, 6, 9)


async def test_completions_default_to_sixteen_tokens(client: openai.AsyncOpenAI) -> None:
    result = await client.completions.create(model="tiny-fake", prompt="defaults please", extra_body={
        "ignore_eos": True})
    assert result.usage is not None and result.usage.completion_tokens == 16


async def test_chat_accepts_text_parts_and_max_completion_tokens(client: openai.AsyncOpenAI) -> None:
    plain = await client.chat.completions.create(
        model="tiny-fake", messages=[{"role": "user", "content": "hello there"}], max_tokens=5, temperature=0)
    parts = await client.chat.completions.create(
        model="tiny-fake", max_completion_tokens=5, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello "},
                                               {"type": "text", "text": "there"}]}])
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == parts.choices[0].message.content
    assert plain.usage is not None and plain.usage.completion_tokens == 5


async def test_streamed_chat_equals_unstreamed_and_reports_usage(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "stream me"}]
    whole = await client.chat.completions.create(model="tiny-fake", messages=messages,
                                                 max_tokens=12, temperature=0)
    stream = await client.chat.completions.create(
        model="tiny-fake", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12


async def test_raw_stream_is_sse_ending_with_done(worker: Worker) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        worker.url + "/v1/completions", json={"prompt": "raw sse", "max_tokens": 3, "stream": True}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        frames = [f for f in (await resp.text()).split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    assert len(frames) == 4  # three tokens, then [DONE]


async def test_stop_string_cuts_the_text_before_it(client: openai.AsyncOpenAI) -> None:
    prompt = "please stop somewhere"
    full = (await client.completions.create(model="tiny-fake", prompt=prompt, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True})).choices[0].text
    words = full.split(" ")  # ["", w1, w2, ...]
    stop_word = words[4]
    cut = await client.completions.create(model="tiny-fake", prompt=prompt, max_tokens=10, temperature=0,
                                          stop=[stop_word, "never-seen"], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[: full.index(" " + stop_word) + 1]
    assert cut.choices[0].finish_reason == "stop"


async def test_n_samples_are_seeded_and_reproducible(client: openai.AsyncOpenAI) -> None:
    async def sample() -> list[str]:
        result = await client.completions.create(model="tiny-fake", prompt="sample me", max_tokens=8, n=3,
                                                 temperature=1.0, seed=7, extra_body={"ignore_eos": True})
        assert [c.index for c in result.choices] == [0, 1, 2]
        assert result.usage is not None and result.usage.completion_tokens == 24
        return [c.text for c in result.choices]

    first, second = await sample(), await sample()
    assert first == second
    assert len(set(first)) == 3  # seeds are offset per sample


async def test_eos_ends_a_request_unless_ignored(client: openai.AsyncOpenAI) -> None:
    prompt = next(p for p in (f"prompt number {i}" for i in range(200)) if fake_eos_position(p))
    eos_at = fake_eos_position(prompt)
    assert eos_at is not None
    stopped = await client.completions.create(model="tiny-fake", prompt=prompt, max_tokens=60, temperature=0)
    ignored = await client.completions.create(model="tiny-fake", prompt=prompt, max_tokens=60, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens == eos_at
    assert ignored.choices[0].finish_reason == "length"
    assert ignored.choices[0].text.startswith(stopped.choices[0].text)


async def test_native_generate_answers_and_streams(worker: Worker) -> None:
    body = {"prompt": "native call", "max_new_tokens": 5, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(worker.url + "/generate", json=body) as resp:
            answer = await resp.json()
        async with session.post(worker.url + "/generate", json={**body, "stream": True}) as resp:
            frames = [f.removeprefix("data: ") for f in (await resp.text()).split("\n\n") if f]
        async with session.post(worker.url + "/generate",
                                json={**body, "num_return_sequences": 2, "do_sample": True}) as resp:
            multi = await resp.json()
    assert answer["prompt"] == "native call"
    assert answer["tokens_generated"] == 5
    assert answer["generation_time"] >= 0
    assert frames[-1] == "[DONE]"
    streamed = [__import__("json").loads(f) for f in frames[:-1]]
    assert "".join(f["text"] for f in streamed[:-1]) == answer["generated_text"]
    assert streamed[-1]["generated_text"] == answer["generated_text"]
    assert len(multi["generated_text"]) == 2 and multi["tokens_generated"] == 10


async def test_metrics_count_requests_and_tokens(worker: Worker, client: openai.AsyncOpenAI) -> None:
    before = worker.metric("worker_generated_tokens_total")
    await client.completions.create(model="tiny-fake", prompt="count me", max_tokens=4,
                                    extra_body={"ignore_eos": True})
    assert worker.metric("worker_generated_tokens_total") == before + 4
    for name in ("worker_queue_depth", "worker_running_requests", "worker_batch_size_count",
                 "worker_request_latency_seconds_count", "worker_time_to_first_token_seconds_count"):
        assert worker.metric(name) >= 0
    assert worker.metric("worker_requests_total") >= 1


async def test_concurrent_requests_share_batches_and_keep_their_own_results(tmp_path: Path) -> None:
    prompts = [f"concurrent prompt {i} " + "word " * i for i in range(16)]
    with running_worker(tmp_path, "--batch-size", "16", "--fake-step-latency", "0.02") as w:
        async with openai.AsyncOpenAI(base_url=w.url + "/v1", api_key="x", max_retries=0) as c:
            async def one(prompt: str, max_tokens: int) -> str:
                r = await c.completions.create(model="fake-model", prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, extra_body={"ignore_eos": True})
                return r.choices[0].text

            alone = [await one(p, 8 + i) for i, p in enumerate(prompts[:2])]
            batches_before = w.metric("worker_batches_total")
            together = await asyncio.gather(*(one(p, 8 + i) for i, p in enumerate(prompts)))
            batches = w.metric("worker_batches_total") - batches_before
    assert together[:2] == alone
    assert [len(t.split()) for t in together] == [8 + i for i in range(16)]
    assert batches < 16


async def test_first_streamed_token_arrives_before_the_last_is_generated(tmp_path: Path) -> None:
    with running_worker(tmp_path, "--fake-step-latency", "0.05") as w:
        async with openai.AsyncOpenAI(base_url=w.url + "/v1", api_key="x", max_retries=0) as c:
            started = time.monotonic()
            stream = await c.completions.create(model="fake-model", prompt="slowly", max_tokens=30,
                                                stream=True, extra_body={"ignore_eos": True})
            arrivals = [time.monotonic() - started async for chunk in stream if chunk.choices]
    assert len(arrivals) == 30
    assert arrivals[0] < arrivals[-1] / 2  # 30 steps of 50 ms: the first arrives ~1.4 s before the last
