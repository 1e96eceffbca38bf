"""OpenAI Files and Batches through the unmodified OpenAI SDK, against `python -m lb` and fake workers."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from lb.jobs import __main__ as jobs_cli
from tests.batch_support import Cluster, jsonl, line, records, submit, upload, wait_batch
from tests.processes import python_module, test_env

KEY, OTHER_KEY = "key-alice", "key-bob"
MAX_LINES, MAX_BODY, MAX_FILE = 100, 64 * 1024, 1_000_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp: Path = tmp_path_factory.mktemp("batches-api")
    cluster = Cluster(
        tmp,
        workers=2,
        worker_args=("--fake-step-latency", "0.002"),
        lb_args=(
            "--api-key",
            KEY,
            "--api-key",
            OTHER_KEY,
            "--batch-max-lines",
            str(MAX_LINES),
            "--max-body-size",
            str(MAX_BODY),
            "--batch-max-file-size",
            str(MAX_FILE),
        ),
    )
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return cluster.client(KEY)


def test_sdk_round_trip_gives_one_output_line_per_input_line(client: openai.OpenAI) -> None:
    batch_id = submit(client, jsonl([line(i) for i in range(40)]))
    batch = wait_batch(client, batch_id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        40,
        40,
        0,
    )
    out = records(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(40))
    for record in out:
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert batch.error_file_id is None
    assert batch.usage.output_tokens > 0


def _long_line(i: int) -> dict[str, object]:
    return line(i, max_tokens=400)  # ~0.8 s on these workers: a batch that is still running when acted upon


def test_cancel_stops_dispatch_and_keeps_completed_lines(cluster: Cluster, client: openai.OpenAI) -> None:
    before = cluster.received()
    batch_id = submit(client, jsonl([_long_line(i) for i in range(90)]))
    wait_until_done_at_least(client, batch_id, 10)
    cancelled = client.batches.cancel(batch_id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = wait_batch(client, batch_id)
    assert batch.status == "cancelled"
    out = records(client, batch.output_file_id)
    assert 10 <= len(out) < 90 and batch.request_counts.completed == len(out)
    assert all(r["response"]["status_code"] == 200 for r in out)
    sent = cluster.received() - before
    assert sent == len(out)  # lines in flight at the cancel finished and were kept; nothing was sent after


def test_expiry_marks_unsent_lines_batch_expired(cluster: Cluster, client: openai.OpenAI) -> None:
    batch_id = submit(client, jsonl([_long_line(i) for i in range(90)]), window="2s")
    batch = wait_batch(client, batch_id, timeout=30)
    assert batch.status == "expired"
    out, errors = records(client, batch.output_file_id), records(client, batch.error_file_id)
    assert out and errors
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    ids = [r["custom_id"] for r in out + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(90))  # every line exactly once


def wait_until_done_at_least(client: openai.OpenAI, batch_id: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while (client.batches.retrieve(batch_id).request_counts or _NONE).completed < count:
        assert time.monotonic() < deadline, "batch made no progress"
        time.sleep(0.05)


_NONE = SimpleNamespace(completed=0)
GOOD = line("good")
BAD_FILES = {
    "invalid_json_line": (jsonl([GOOD]) + b"{not json\n", 2),
    "invalid_line": (jsonl([GOOD, [1, 2]]), 2),
    "missing_custom_id": (jsonl([GOOD, {**line(1), "custom_id": ""}]), 2),
    "duplicate_custom_id": (jsonl([GOOD, line(1), line(1)]), 3),
    "invalid_method": (jsonl([GOOD, {**line(1), "method": "GET"}]), 2),
    "mismatched_url": (jsonl([GOOD, {**line(1), "url": "/v1/completions"}]), 2),
    "invalid_body": (jsonl([GOOD, {**line(1), "body": "hello"}]), 2),
    "missing_model": (jsonl([GOOD, {**line(1), "body": {"messages": []}}]), 2),
    "model_not_found": (jsonl([GOOD, line(1, model="no-such-model")]), 2),
    "too_many_lines": (jsonl([line(i) for i in range(MAX_LINES + 1)]), MAX_LINES + 1),
    "line_too_large": (jsonl([GOOD, line(1, padding="x" * MAX_BODY)]), 2),
    "empty_file": (b"\n\n", None),
}


@pytest.mark.parametrize("code", sorted(BAD_FILES))
def test_bad_input_file_fails_the_batch_with_its_named_error_and_sends_nothing(
    cluster: Cluster, client: openai.OpenAI, code: str
) -> None:
    data, line_number = BAD_FILES[code]
    before = cluster.received()
    batch = wait_batch(client, submit(client, data))
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    first = batch.errors.data[0]
    assert first.code == code and first.line == line_number
    assert cluster.received() == before  # all or nothing: the good lines were not sent either


def test_file_over_the_size_limit_is_refused_at_upload(cluster: Cluster, client: openai.OpenAI) -> None:
    data = jsonl([line(i, padding="x" * 1000) for i in range(MAX_FILE // 1000 + 10)])
    with pytest.raises(openai.APIStatusError) as info:
        upload(client, data)
    assert info.value.status_code == 413 and info.value.body["code"] == "file_too_large"  # type: ignore[index]
    assert not list(Path(cluster.data_dir, "files").glob("*.part"))  # nothing half-written is left


def test_unsupported_endpoint_is_400(client: openai.OpenAI) -> None:
    file_id = upload(client, jsonl([GOOD]))
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=file_id, endpoint="/v1/moderations", completion_window="24h")  # type: ignore[arg-type]
    assert info.value.body["code"] == "unsupported_endpoint"  # type: ignore[index]


def test_files_and_batches_belong_to_the_key_that_created_them(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    batch = wait_batch(client, submit(client, jsonl([line(i) for i in range(3)])))
    other = cluster.client(OTHER_KEY)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(batch.output_file_id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(batch.input_file_id)
    assert batch.id not in [b.id for b in other.batches.list()]
    assert batch.id in [b.id for b in client.batches.list()]
    with pytest.raises(openai.AuthenticationError):
        cluster.client("wrong-key").batches.list()


def test_batches_list_pages_with_after_and_limit(client: openai.OpenAI) -> None:
    made = [submit(client, jsonl([line(0)])) for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    following = client.batches.list(limit=2, after=page.data[-1].id)
    assert following.data[0].id == made[0]


def test_jobs_cli_submits_follows_and_downloads(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_bytes(jsonl([line(i) for i in range(30)]))
    cli = ("--url", cluster.url, "--api-key", KEY)
    done = subprocess.run(
        python_module(
            "lb.jobs",
            "submit",
            str(source),
            *cli,
            "--wait",
            "--poll-interval",
            "0.1",
            "--output-dir",
            str(tmp_path / "out"),
        ),
        capture_output=True,
        text=True,
        env=test_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "completed: 30 completed, 0 failed" in done.stderr and "req" in done.stderr  # the tqdm bar
    output = Path(done.stdout.split()[0])
    assert sorted(json.loads(r)["custom_id"] for r in output.read_text().splitlines()) == sorted(
        f"req-{i}" for i in range(30)
    )
    batch_id = output.name.removesuffix("_output.jsonl")
    assert jobs_cli.main(["status", batch_id, *cli]) == 0  # in-process: one interpreter start is enough
    assert capsys.readouterr().out.strip() == f"{batch_id} completed 30/30 completed, 0 failed"


def test_a_workers_4xx_goes_to_the_error_file_and_the_rest_completes(client: openai.OpenAI) -> None:
    refused = line("too-long", max_tokens=10_000_000)  # the worker answers 400: no room in its context
    batch = wait_batch(client, submit(client, jsonl([line(0), refused, line(1)])))
    assert batch.status == "completed" and batch.request_counts.failed == 1
    (error,) = records(client, batch.error_file_id)
    assert error["custom_id"] == "req-too-long" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["message"] and error["error"]["code"]
    assert sorted(r["custom_id"] for r in records(client, batch.output_file_id)) == ["req-0", "req-1"]
