"""The OpenAI Files and Batches API through the unmodified OpenAI SDK, against `python -m lb` and fake workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.batch_support import Cluster, all_records, jsonl, line, records, submit, wait_batch

KEY, OTHER_KEY = "key-alice", "key-bob"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp: Path = tmp_path_factory.mktemp("batches-api")
    cluster = Cluster(tmp, workers=2, lb_args=("--api-key", KEY, "--api-key", OTHER_KEY))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return cluster.client(KEY)


def test_sdk_round_trip_gives_one_output_line_per_input_line(client: openai.OpenAI) -> None:
    batch_id = submit(client, jsonl([line(i) for i in range(40)]))
    batch = wait_batch(client, batch_id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (40, 40, 0)
    out = records(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(40))
    for record in out:
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert batch.error_file_id is None
    assert batch.usage.output_tokens > 0
