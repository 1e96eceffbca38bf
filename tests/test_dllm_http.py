"""A real `python -m workers --engine dllm` process on the tiny diffusion model, behind a real balancer
(`python -m lb`), driven by the OpenAI SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from tests.lb_cluster import post_json
from tests.processes import ManagedProcess, free_port, get_json, python_module
from workers.errors import UnsupportedParameter
from workers.protocol import parse_request

MAX_MODEL_LEN = 256
GREEDY: dict[str, Any] = {"ignore_eos": True, "block_length": 4}


@pytest.fixture(scope="module")
def lb_url(tiny_dllm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The balancer's URL, in front of one dllm worker; both stopped (by process group) at the end."""
    logs = tmp_path_factory.mktemp("dllm")
    worker_port, lb_port = free_port(), free_port()
    worker = ManagedProcess(python_module(
        "workers", "--engine", "dllm", "--model-path", str(tiny_dllm_dir), "--trust-remote-code",
        "--served-model-name", "tiny-dllm", "--port", str(worker_port), "--batch-size", "8",
        "--max-wait-time", "0.02", "--max-model-len", str(MAX_MODEL_LEN), "--device", "cpu",
        "--dllm-gen-length", "16", "--dllm-block-length", "8",
    ), logs / "worker.log")
    lb = ManagedProcess(python_module(
        "lb", "--port", str(lb_port), "--workers", f"http://127.0.0.1:{worker_port}",
        "--health-check-interval", "0.2", "--health-check-timeout", "2",
    ), logs / "lb.log")
    try:
        worker.wait_http_ok(f"http://127.0.0.1:{worker_port}/health", timeout=180)
        lb.wait_http_ok(f"http://127.0.0.1:{lb_port}/health", timeout=60)
        yield f"http://127.0.0.1:{lb_port}"
    finally:
        lb.stop()
        worker.stop()


@pytest_asyncio.fixture(loop_scope="function")
async def client(lb_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=lb_url + "/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


async def complete(client: AsyncOpenAI, prompt: str, **extra: Any) -> Any:
    return await client.completions.create(model="tiny-dllm", prompt=prompt, max_tokens=16, temperature=0,
                                           extra_body={**GREEDY, **extra})


async def test_completions_through_the_balancer_are_honest(client: AsyncOpenAI) -> None:
    out = await complete(client, "def fibonacci(n):")
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert out.usage is not None and out.usage.completion_tokens == 16 and out.usage.prompt_tokens > 0
    assert out.model == "tiny-dllm"


async def test_concurrent_requests_batch_and_each_gets_its_own_answer(client: AsyncOpenAI) -> None:
    prompts = [f"{i}: " + "import os\n" * (1 + 3 * i) for i in range(4)]
    singles = [(await complete(client, p)).choices[0].text for p in prompts]
    together = await asyncio.gather(*(complete(client, p) for p in prompts))
    assert [o.choices[0].text for o in together] == singles
    assert len(set(singles)) == len(singles)


async def test_streamed_chat_sends_each_block_as_it_is_committed(client: AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "Say something."}]
    whole = await client.chat.completions.create(model="tiny-dllm", messages=messages,  # type: ignore[arg-type]
                                                 max_tokens=16, temperature=0, extra_body=GREEDY)
    stream = await client.chat.completions.create(
        model="tiny-dllm", messages=messages, max_tokens=16, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body=GREEDY,
    )
    contents, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                contents.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(contents) == whole.choices[0].message.content
    assert 2 <= len(contents) <= 4  # one chunk per committed block of 4 (a block may decode to no text)
    assert finish == "length" and usage is not None and usage.completion_tokens == 16


async def test_chat_without_max_tokens_generates_the_default_length(client: AsyncOpenAI) -> None:
    out = await client.chat.completions.create(
        model="tiny-dllm", messages=[{"role": "user", "content": "hi"}], temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage is not None and out.usage.completion_tokens == 16  # --dllm-gen-length


def test_generate_endpoint_through_the_balancer(lb_url: str) -> None:
    status, body = post_json(lb_url + "/generate", {"prompt": "def main():", "gen_length": 8, "steps": 4,
                                                    "algorithm": "threshold", "threshold": 0.5,
                                                    "ignore_eos": True})
    assert status == 200, body
    assert body["tokens_generated"] == 8 and body["finish_reason"] == "length"


def test_generate_streams_blocks_then_the_answer(lb_url: str) -> None:
    request = urllib.request.Request(
        lb_url + "/generate", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": "def main():", "max_new_tokens": 8, "block_length": 4, "stream": True,
                         "ignore_eos": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as resp:
        frames = [line.removeprefix(b"data: ") for line in resp.read().splitlines() if line]
    assert frames[-1] == b"[DONE]"
    answer = json.loads(frames[-2])
    parts = [json.loads(f)["text"] for f in frames[:-2]]
    assert "".join(parts) == answer["generated_text"] and answer["tokens_generated"] == 8


@pytest.mark.parametrize(("extra", "field"), [
    ({"block_length": 5}, "block_length"),  # does not divide max_tokens=16
    ({"block_length": 2, "steps": 4}, "steps"),  # 8 blocks need 8 steps at least
    ({"algorithm": "sideways"}, "algorithm"),
    ({"gen_length": MAX_MODEL_LEN}, "gen_length"),  # no room for the prompt
    ({"gen_length": MAX_MODEL_LEN - 3}, "gen_length"),  # fits alone, not with this prompt
    ({"threshold": 2}, "threshold"),
    ({"top_p": 0.5}, "top_p"),
])
def test_bad_diffusion_parameters_get_400_naming_the_field(
    lb_url: str, extra: dict[str, Any], field: str,
) -> None:
    body = {"model": "tiny-dllm", "prompt": "hello there, how are you today?", "max_tokens": 16, **extra}
    status, answer = post_json(lb_url + "/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == field and answer["error"]["type"] == "invalid_request_error"


def test_health_reports_the_dllm_engine(lb_url: str) -> None:
    workers = get_json(lb_url + "/stats")["workers"]
    health = get_json(workers[0]["url"] + "/health")
    assert health["engine"] == "dllm" and health["status"] == "ok"


def test_other_engines_refuse_diffusion_fields() -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        parse_request("completions", {"prompt": "x", "steps": 8}, "m", 100)
    assert caught.value.param == "steps"
