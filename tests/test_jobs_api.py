"""Eval and data-generation jobs and /solve/* through a real balancer process and real worker processes.

One module cluster: a fake-engine worker (`fake-model`), a stub worker with known replies (`answer-stub`,
tests/answer_stub.py) and a slow one (`slow-stub`, 0.3 s a reply), behind `python -m lb` with its own
--data-dir and --datasets-dir. The stubs let a test know which eval samples are right; every line still
goes client -> balancer -> batch engine -> admission -> worker over HTTP.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.answer_stub import CODE, is_right, reply
from tests.lb_cluster import FAST
from tests.processes import ManagedProcess, free_port, get_json, python_module

SUMS = [(a, a + 7) for a in range(30)]  # 30 problems; the stub gets those whose sum % 3 == 0 wrong


@dataclass
class Cluster:
    lb: str
    fake: str
    stub: str
    slow: str
    data_dir: Path
    datasets: Path
    tmp: Path


def call(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def start(procs: list[ManagedProcess], tmp: Path, name: str, *args: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = ManagedProcess(python_module(*args[:1], "--port", str(port), *args[1:]), tmp / f"{name}.log")
    procs.append(proc)
    return proc, f"http://127.0.0.1:{port}"


def start_lb(
    procs: list[ManagedProcess],
    cluster_tmp: Path,
    workers: list[str],
    data_dir: Path,
    datasets: Path,
    *args: str,
) -> tuple[ManagedProcess, str]:
    proc, url = start(
        procs,
        cluster_tmp,
        f"lb-{len(procs)}",
        "lb",
        "--workers",
        ",".join(workers),
        "--health-check-interval",
        "0.2",
        "--data-dir",
        str(data_dir),
        "--datasets-dir",
        str(datasets),
        *args,
    )
    proc.wait_http_ok(url + "/health")
    return proc, url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("jobs-cluster")
    procs: list[ManagedProcess] = []
    try:
        fake, fake_url = start(
            procs, tmp, "fake", "workers", "--engine", "fake", "--log-level", "warning", *FAST
        )
        stub, stub_url = start(procs, tmp, "stub", "tests.answer_stub")
        slow, slow_url = start(
            procs, tmp, "slow", "tests.answer_stub", "--delay", "0.3", "--model", "slow-stub"
        )
        for proc, url in ((fake, fake_url), (stub, stub_url), (slow, slow_url)):
            proc.wait_http_ok(url + "/health")
        datasets = tmp / "datasets"
        datasets.mkdir()
        rows = [{"prompt": f"{a} + {b}", "answer": str(a + b)} for a, b in SUMS]
        (datasets / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "secret.jsonl").write_text(json.dumps({"prompt": "secret", "answer": "1"}) + "\n")
        data_dir = tmp / "data"
        _, lb_url = start_lb(procs, tmp, [fake_url, stub_url, slow_url], data_dir, datasets)
        yield Cluster(lb_url, fake_url, stub_url, slow_url, data_dir, datasets, tmp)
    finally:
        for proc in reversed(procs):
            proc.stop()


def wait_job(
    url: str,
    job_id: str,
    key: str | None = None,
    timeout: float = 60,
    until: tuple[str, ...] = ("completed", "failed", "cancelled"),
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, job = call("GET", f"{url}/jobs/{job_id}", key=key)
        assert status == 200, job
        if job["status"] in until:
            return dict(job)
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s: {job['progress']}")
        time.sleep(0.05)


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def download(url: str, key: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.read().decode()


def test_eval_job_accuracy_equals_the_correct_count_in_samples_jsonl(cluster: Cluster) -> None:
    status, job = call(
        "POST",
        cluster.lb + "/eval/jobs",
        {
            "model_id": "answer-stub",
            "name": "sums",
            "dataset_ref": "sums",
            "metrics": ["accuracy"],
            "per_example_logging": True,
        },
    )
    assert status == 200, job
    assert job["status"] == "pending" and job["type"] == "eval" and job["progress"]["total"] == len(SUMS)
    job = wait_job(cluster.lb, job["id"])
    assert job["status"] == "completed", job["error"]
    samples = jsonl(download(f"{cluster.lb}/eval/jobs/{job['id']}/samples"))
    expected = sum(is_right(a, b) for a, b in SUMS)
    assert 0 < expected < len(SUMS)
    assert job["result"]["correct"] == sum(s["correct"] for s in samples) == expected
    assert job["result"]["total_samples"] == len(samples) == len(SUMS)
    assert job["result"]["accuracy"] == pytest.approx(expected / len(SUMS))
    by_index = {s["index"]: s for s in samples}
    for i, (a, b) in enumerate(SUMS):  # what the worker wrote, what was read from it, how it was scored
        assert by_index[i]["response"] == reply(f"{a} + {b}")
        assert by_index[i]["correct"] is is_right(a, b)
    received = get_json(cluster.stub + "/received")
    assert sorted(received) == sorted(f"{a} + {b}" for a, b in SUMS)  # each sample reached the worker once
    assert job["progress"] == {"total": len(SUMS), "completed": len(SUMS), "failed": 0, "percent": 100.0}


def test_data_gen_prompts_job_writes_the_asked_number_of_examples(cluster: Cluster) -> None:
    status, job = call(
        "POST",
        cluster.lb + "/data_gen/jobs",
        {
            "model_id": "fake-model",
            "strategy": "prompts",
            "config": {
                "prompts": ["Tell a story", "Name colours"],
                "num_examples": 7,
                "shard_size": 3,
                "max_tokens": 6,
            },
        },
    )
    assert status == 200, job
    job = wait_job(cluster.lb, job["id"])
    assert job["status"] == "completed", job["error"]
    assert job["result"]["num_examples"] == 7
    shards = job["result"]["shards"]
    assert [s["examples"] for s in shards] == [3, 3, 1]
    records = [
        r
        for s in shards
        for r in jsonl(download(f"{cluster.lb}/data_gen/jobs/{job['id']}/shards/{s['file']}"))
    ]
    assert [r["id"] for r in records] == list(range(7))
    assert [r["prompt"] for r in records[:3]] == ["Tell a story", "Name colours", "Tell a story"]
    assert all(len(r["response"].split()) >= 1 for r in records)  # the fake engine's words, from the worker
    assert records[0]["response"] != records[2]["response"]  # same prompt, its own seed: another example


def test_data_gen_self_instruct_writes_the_asked_number_of_examples(cluster: Cluster) -> None:
    status, job = call(
        "POST",
        cluster.lb + "/data_gen/jobs",
        {
            "model_id": "answer-stub",
            "strategy": "self_instruct",
            "config": {"num_examples": 5},
        },
    )
    assert status == 200, job
    job = wait_job(cluster.lb, job["id"])
    assert job["status"] == "completed", job["error"]
    assert job["result"]["num_examples"] == 5 and len(job["batch_ids"]) == 2
    records = jsonl(download(f"{cluster.lb}/data_gen/jobs/{job['id']}/shards/shard-00000.jsonl"))
    assert len(records) == 5
    for record in records:  # phase two answered what phase one wrote (the stub echoes the message)
        assert record["output"] == f"echo: {record['instruction']}"
        assert record["instruction"].startswith("echo: Come up with a new task instruction.")


def test_solve_math_extracts_the_answer_from_the_workers_text(cluster: Cluster) -> None:
    status, body = call("POST", cluster.lb + "/solve/math", {"problem": "2 + 5", "model": "answer-stub"})
    assert status == 200, body
    assert body["solution"] == reply("2 + 5") and body["answer"] == "7"
    assert body["problem"] == "2 + 5" and body["generation_time"] > 0
    status, body = call("POST", cluster.lb + "/solve/math", {"problem": "4 + 5", "model": "answer-stub"})
    assert body["answer"] == "10"  # what the worker said (wrong on purpose), not the true sum


def test_solve_coding_extracts_the_fenced_code(cluster: Cluster) -> None:
    status, body = call(
        "POST", cluster.lb + "/solve/coding", {"problem": "code: add", "model": "answer-stub"}
    )
    assert status == 200, body
    assert body["code"] == CODE and "```python" in body["solution"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/eval/jobs", {"dataset_ref": "sums"}, 400, "model_id"),
        ("/eval/jobs", {"model_id": "answer-stub", "dataset_ref": "nope"}, 404, "dataset_ref"),
        (
            "/eval/jobs",
            {"model_id": "answer-stub", "dataset_ref": "sums", "metrics": ["bleu"]},
            400,
            "metrics",
        ),
        ("/eval/jobs", {"model_id": "answer-stub", "dataset_ref": "../secret"}, 400, "dataset_ref"),
        ("/eval/jobs", {"model_id": "answer-stub", "dataset_ref": "../secret.jsonl"}, 400, "dataset_ref"),
        ("/eval/jobs", {"model_id": "answer-stub", "dataset_ref": "/etc/passwd"}, 400, "dataset_ref"),
        ("/eval/jobs", {"model_id": "no-such-model", "dataset_ref": "sums"}, 404, "model_id"),
        (
            "/eval/jobs",
            {"model_id": "answer-stub", "dataset_ref": "sums", "max_samples": 0},
            400,
            "max_samples",
        ),
        ("/eval/jobs", {"model_id": "answer-stub", "dataset_ref": "sums", "colour": 1}, 400, "colour"),
        ("/data_gen/jobs", {"model_id": "fake-model", "strategy": "magic"}, 400, "strategy"),
        (
            "/data_gen/jobs",
            {"model_id": "fake-model", "strategy": "self_instruct"},
            400,
            "config.num_examples",
        ),
        (
            "/data_gen/jobs",
            {"model_id": "fake-model", "strategy": "prompts", "config": {}},
            400,
            "config.prompts",
        ),
        ("/data_gen/jobs", {"strategy": "prompts", "config": {"prompts": ["x"]}}, 400, "model_id"),
        ("/solve/math", {"model": "answer-stub"}, 400, "problem"),
    ],
)
def test_bad_job_requests_get_an_error_naming_the_field(
    cluster: Cluster, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    got, error = call("POST", cluster.lb + path, body)
    assert (got, error["error"]["param"]) == (status, param), error
    assert error["error"]["message"]


def test_dataset_refs_that_leave_the_datasets_dir_are_refused(cluster: Cluster) -> None:
    outside = cluster.tmp / "secret.jsonl"  # a valid dataset, just not in --datasets-dir
    link = cluster.datasets / "link.jsonl"
    if not link.exists():
        link.symlink_to(outside)
    for ref in (str(outside), "link", "../secret", "sub/../../secret.jsonl"):
        status, error = call(
            "POST", cluster.lb + "/eval/jobs", {"model_id": "answer-stub", "dataset_ref": ref}
        )
        assert (status, error["error"]["param"]) == (400, "dataset_ref"), (ref, error)
        assert "datasets directory" in error["error"]["message"]


def test_a_bad_dataset_line_is_refused_naming_the_line(cluster: Cluster) -> None:
    (cluster.datasets / "broken.jsonl").write_text('{"prompt": "1 + 1", "answer": "2"}\n{"prompt": "x"}\n')
    status, error = call(
        "POST", cluster.lb + "/eval/jobs", {"model_id": "answer-stub", "dataset_ref": "broken"}
    )
    assert status == 400 and "line 2" in error["error"]["message"] and "'answer'" in error["error"]["message"]


def test_jobs_are_listed_by_type_and_status_and_counted(cluster: Cluster) -> None:
    status, made = call(
        "POST",
        cluster.lb + "/eval/jobs",
        {"model_id": "answer-stub", "dataset_ref": "sums", "max_samples": 3},
    )
    wait_job(cluster.lb, made["id"])
    status, listed = call("GET", cluster.lb + "/jobs?type=eval&status=completed&limit=100")
    assert status == 200 and listed["data"][0]["id"] == made["id"]  # newest first
    assert {j["type"] for j in listed["data"]} == {"eval"} and {j["status"] for j in listed["data"]} == {
        "completed"
    }
    status, listed = call("GET", cluster.lb + "/jobs?type=data_gen")
    assert listed["data"] and {j["type"] for j in listed["data"]} == {"data_gen"}
    assert call("GET", cluster.lb + "/data_gen/jobs")[1]["data"] == listed["data"]
    status, listed = call("GET", cluster.lb + "/jobs?limit=1")
    assert len(listed["data"]) == 1
    status, stats = call("GET", cluster.lb + "/jobs/stats")
    _, everything = call("GET", cluster.lb + "/jobs?limit=1000")
    assert stats["done"] == sum(j["status"] == "completed" for j in everything["data"]) >= 1
    assert stats["jobs_last_hour"] == stats["total"] == len(everything["data"])
    assert call("GET", cluster.lb + "/jobs?type=train")[1]["error"]["param"] == "type"
    assert call("GET", cluster.lb + "/jobs?limit=0")[1]["error"]["param"] == "limit"
    assert call("GET", cluster.lb + f"/data_gen/jobs/{made['id']}")[0] == 404  # an eval job's id


def test_cancel_stops_the_job_and_keeps_the_completed_samples(cluster: Cluster) -> None:
    status, job = call("POST", cluster.lb + "/eval/jobs", {"model_id": "slow-stub", "dataset_ref": "sums"})
    assert status == 200, job
    deadline = time.monotonic() + 20
    while call("GET", f"{cluster.lb}/jobs/{job['id']}")[1]["progress"]["completed"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, cancelled = call("POST", f"{cluster.lb}/eval/jobs/{job['id']}/cancel")
    assert status == 200 and cancelled["status"] in ("cancelling", "cancelled")
    job = wait_job(cluster.lb, job["id"])
    assert job["status"] == "cancelled"
    samples = jsonl(download(f"{cluster.lb}/eval/jobs/{job['id']}/samples"))
    assert 0 < job["result"]["total_samples"] == len(samples) < len(SUMS)
    assert job["result"]["correct"] == sum(s["correct"] for s in samples)


def test_a_job_survives_a_sigkilled_balancer_and_belongs_to_its_key(cluster: Cluster) -> None:
    procs: list[ManagedProcess] = []
    data_dir = cluster.tmp / "data-restart"
    keys = ("--api-key", "alice", "--api-key", "bob")
    try:
        lb, url = start_lb(procs, cluster.tmp, [cluster.slow], data_dir, cluster.datasets, *keys)
        status, job = call(
            "POST", url + "/eval/jobs", {"model_id": "slow-stub", "dataset_ref": "sums"}, key="alice"
        )
        assert status == 200, job
        deadline = time.monotonic() + 20
        while call("GET", f"{url}/jobs/{job['id']}", key="alice")[1]["progress"]["completed"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        lb.signal(signal.SIGKILL)
        lb.popen.wait(10)
        _, url = start_lb(procs, cluster.tmp, [cluster.slow], data_dir, cluster.datasets, *keys)
        job = wait_job(url, job["id"], key="alice")
        assert job["status"] == "completed", job["error"]
        samples = jsonl(download(f"{url}/eval/jobs/{job['id']}/samples", key="alice"))
        assert sorted(s["index"] for s in samples) == list(range(len(SUMS)))  # each sample exactly once
        assert job["result"]["correct"] == sum(is_right(a, b) for a, b in SUMS)
        assert call("GET", f"{url}/jobs/{job['id']}", key="bob")[0] == 404  # another key's job
        assert call("GET", f"{url}/jobs", key="bob")[1]["data"] == []
        assert call("GET", f"{url}/jobs")[0] == 401
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.mark.timeout(300)
def test_eval_job_on_the_tiny_transformers_model_scores_its_real_replies(
    cluster: Cluster, tiny_model_dir: Path
) -> None:
    """Greedy replies are learnt first through the balancer; a dataset that expects two of them (and not the
    other two) must then score exactly 2 of 4 under exact_match."""
    procs: list[ManagedProcess] = []
    try:
        worker, worker_url = start(
            procs,
            cluster.tmp,
            "hf",
            "workers",
            "--engine",
            "hf",
            "--model-path",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--served-model-name",
            "tiny",
        )
        worker.wait_http_ok(worker_url + "/health", timeout=240)
        _, url = start_lb(procs, cluster.tmp, [worker_url], cluster.tmp / "data-tiny", cluster.datasets)
        prompts = ["Hello", "def main", "The capital of France is", "import os"]
        replies = []
        for prompt in prompts:
            status, body = call(
                "POST",
                url + "/v1/chat/completions",
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 4,
                    "temperature": 0,
                },
            )
            assert status == 200, body
            replies.append(body["choices"][0]["message"]["content"])
        rows = [
            {"prompt": p, "answer": r if i % 2 == 0 else r + " (not said)"}
            for i, (p, r) in enumerate(zip(prompts, replies, strict=True))
        ]
        (cluster.datasets / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        status, job = call(
            "POST",
            url + "/eval/jobs",
            {
                "model_id": "tiny",
                "dataset_ref": "tiny",
                "metrics": ["exact_match"],
                "max_tokens": 4,
            },
        )
        assert status == 200, job
        job = wait_job(url, job["id"], timeout=120)
        assert job["status"] == "completed", job["error"]
        samples = jsonl(download(f"{url}/eval/jobs/{job['id']}/samples"))
        assert [s["response"] for s in sorted(samples, key=lambda s: s["index"])] == replies
        assert job["result"]["correct"] == sum(s["correct"] for s in samples) == 2
    finally:
        for proc in reversed(procs):
            proc.stop()
