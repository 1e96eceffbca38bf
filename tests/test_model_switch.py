"""The checkpoint registry and its rolling switch, for real: two tiny-model workers behind `python -m lb`.

Two checkpoints of the same architecture with different weights (A: the tiny model, B: re-initialised), so a
response's text says which one produced it. Clients keep sending the old name throughout.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI

from tests.lb_cluster import post_json
from tests.processes import ManagedProcess, free_port, get_json, python_module

PROMPT = "def handler(request):\n"
CONCURRENCY = 8


@dataclass
class Cluster:
    lb: str
    workers: list[str]
    checkpoint_a: Path
    checkpoint_b: Path


def make_checkpoint_b(tiny: Path, out: Path) -> Path:
    """The tiny model's architecture and tokenizer with other weights (re-initialised with seed 1)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    return out


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("switch")
    checkpoint_b = make_checkpoint_b(tiny_model_dir, root / "ckpt-b")
    procs: list[ManagedProcess] = []
    workers = []
    for i in range(2):
        port = free_port()
        procs.append(ManagedProcess(python_module(
            "workers", "--engine", "hf", "--model-path", str(tiny_model_dir), "--served-model-name", "ckpt-a",
            "--port", str(port), "--device", "cpu", "--batch-size", "8", "--max-wait-time", "0.01",
            "--max-model-len", "256",
        ), root / f"worker-{i}.log"))
        workers.append(f"http://127.0.0.1:{port}")
    lb_port = free_port()
    procs.append(ManagedProcess(python_module(
        "lb", "--port", str(lb_port), "--workers", ",".join(workers), "--health-check-interval", "0.2",
        "--data-dir", str(root / "data"), "--drain-timeout", "30",
    ), root / "lb.log"))
    try:
        for proc, url in zip(procs, workers, strict=False):
            proc.wait_http_ok(url + "/health", timeout=120)
        procs[-1].wait_http_ok(f"http://127.0.0.1:{lb_port}/health", timeout=30)
        yield Cluster(f"http://127.0.0.1:{lb_port}", workers, tiny_model_dir, checkpoint_b)
    finally:
        for proc in reversed(procs):
            proc.stop()


def register(lb: str, **body: Any) -> tuple[int, Any]:
    return post_json(lb + "/models/register", body)


def health_model(worker: str) -> str:
    return str(get_json(worker + "/health")["model"])


async def complete(sdk: AsyncOpenAI, model: str) -> tuple[str, str]:
    out = await sdk.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    return out.model, out.choices[0].text


async def test_rolling_switch_under_load_fails_no_request_and_ends_on_the_new_model(cluster: Cluster) -> None:
    assert register(cluster.lb, id="ckpt-a", path=str(cluster.checkpoint_a), source="tiny")[0] == 201
    status, body = register(cluster.lb, id="ckpt-b", path=str(cluster.checkpoint_b), source="trainer",
                            tags=["step-2"])
    assert status == 201, body
    async with AsyncOpenAI(base_url=cluster.lb + "/v1", api_key="x", max_retries=0, timeout=60) as sdk:
        _, text_a = await complete(sdk, "ckpt-a")
        results: list[tuple[float, str, str]] = []
        failures: list[BaseException] = []
        switched_at: list[float] = []

        async def client() -> None:
            while not switched_at or time.monotonic() < switched_at[0] + 1.5:
                try:
                    model, text = await complete(sdk, "ckpt-a")  # the old name, all along
                except Exception as exc:  # an HTTP error, a reset, a 503: all count as failures
                    failures.append(exc)
                else:
                    results.append((time.monotonic(), model, text))

        async def switch() -> tuple[int, Any]:
            await asyncio.sleep(0.5)  # load is running
            answer = await asyncio.to_thread(post_json, cluster.lb + "/models/set_active?wait=1",
                                             {"id": "ckpt-b"}, "POST", 120)
            switched_at.append(time.monotonic())
            return answer

        outcome, *_ = await asyncio.gather(switch(), *(client() for _ in range(CONCURRENCY)))
        _, text_b = await complete(sdk, "ckpt-b")

    assert outcome[0] == 200, outcome
    assert [s["state"] for s in outcome[1]["steps"]] == ["done", "done"]
    assert failures == []
    assert text_a != text_b  # the two checkpoints answer differently, so a text names its producer
    assert {(m, t) for _, m, t in results} <= {("ckpt-a", text_a), ("ckpt-b", text_b)}
    later = [(m, t) for at, m, t in results if at > switched_at[0]]
    assert later and set(later) == {("ckpt-b", text_b)}
    assert any(m == "ckpt-a" for _, m, _ in results)  # the load ran before the switch
    # and during it: old-name requests reached switched workers while the last one drained and loaded
    assert any(m == "ckpt-b" and at < switched_at[0] for at, m, _ in results)
    assert [health_model(w) for w in cluster.workers] == ["ckpt-b", "ckpt-b"]
    stats = get_json(cluster.lb + "/stats")
    assert stats["model_switch"]["state"] == "done" and stats["model_switch"]["checkpoint"] == "ckpt-b"
    listed = {c["id"]: c for c in get_json(cluster.lb + "/models")["data"]}
    assert listed["ckpt-b"]["workers"] == [0, 1] and listed["ckpt-b"]["tags"] == ["step-2"]
    assert listed["ckpt-a"]["workers"] == []


def test_a_checkpoint_that_fails_to_load_leaves_the_old_model_serving(
    cluster: Cluster, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(cluster.checkpoint_b / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert register(cluster.lb, id="ckpt-broken", path=str(broken))[0] == 201

    status, body = post_json(cluster.lb + "/models/set_active?wait=1", {"id": "ckpt-broken"}, timeout=120)

    assert status == 502 and body["error"]["code"] == "switch_failed"
    assert "worker 0" in body["error"]["message"] and "serves its old model" in body["error"]["message"]
    switch = get_json(cluster.lb + "/models/active")["switch"]
    assert [s["state"] for s in switch["steps"]] == ["failed", "skipped"]
    assert [health_model(w) for w in cluster.workers] == ["ckpt-b", "ckpt-b"]
    body = json.dumps({"model": "ckpt-b", "prompt": PROMPT, "max_tokens": 4}).encode()
    req = urllib.request.Request(cluster.lb + "/v1/completions", method="POST", data=body,
                                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 10  # the worker is routable again once its health checks pass
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert json.loads(resp.read())["model"] == "ckpt-b"
                break
        except urllib.error.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_registry_errors_are_clear(cluster: Cluster, tmp_path: Path) -> None:
    status, body = post_json(cluster.lb + "/models/set_active", {"id": "no-such-checkpoint"})
    assert status == 404 and body["error"]["code"] == "checkpoint_not_found"
    empty = tmp_path / "empty"
    empty.mkdir()
    status, body = register(cluster.lb, id="ckpt-empty", path=str(empty))
    assert status == 422 and "no config.json" in body["error"]["message"]
    status, body = register(cluster.lb, id="ckpt-missing", path=str(tmp_path / "nowhere"))
    assert status == 422 and "not a directory" in body["error"]["message"]
    status, body = register(cluster.lb, id="ckpt-b", path=str(cluster.checkpoint_b))
    assert status == 409 and body["error"]["code"] == "checkpoint_exists"
    status, body = register(cluster.lb, id="has space", path=str(cluster.checkpoint_b))
    assert status == 400 and body["error"]["param"] == "id"
    status, body = post_json(cluster.lb + "/models/set_active", {"id": "ckpt-a", "workers": [7]})
    assert status == 400 and body["error"]["param"] == "workers"

    status, first = post_json(cluster.lb + "/models/set_active", {"id": "ckpt-a", "workers": [1]})
    assert status == 202 and first["state"] == "running"
    status, body = post_json(cluster.lb + "/models/set_active", {"id": "ckpt-b"})
    assert status == 409 and body["error"]["code"] == "switch_in_progress"
    deadline = time.monotonic() + 60
    while get_json(cluster.lb + "/models/active")["switch"]["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    active = {m["id"]: m["workers"] for m in get_json(cluster.lb + "/models/active")["active"]}
    assert active == {"ckpt-a": [1], "ckpt-b": [0]}  # two models on disjoint sets of workers
